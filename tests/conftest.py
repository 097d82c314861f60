import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import metrics  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    errors = metrics.GRADIENT_ERRORS
    for label, pick in (("fp32", lambda n: "bf16" not in n), ("bf16", lambda n: "bf16" in n)):
        chosen = {n: e for n, e in errors.items() if pick(n)}
        if chosen:
            name = max(chosen, key=chosen.get)
            terminalreporter.write_line(f"gradient check ({label}): {len(chosen)} engine cases, "
                                        f"worst relative error {chosen[name]:.2e} ({name})")
