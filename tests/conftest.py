import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import metrics  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    errors = metrics.GRADIENT_ERRORS
    if errors:
        name = max(errors, key=errors.get)
        terminalreporter.write_line(
            f"gradient check: {len(errors)} engine cases, worst relative error {errors[name]:.2e} ({name})")
