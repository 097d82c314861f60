"""Numbers the tests measure and the session summary prints (see conftest.py)."""
GRADIENT_ERRORS = {}   # case name -> worst relative error of a parameter update vs the reference
