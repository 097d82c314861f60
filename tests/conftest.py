import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import metrics  # noqa: E402

# DS_INTERLOCK_GRADIENT_REPORT=FILE also writes every case's error as JSON (for runs whose log is cut).
REPORT_ENV = "DS_INTERLOCK_GRADIENT_REPORT"


def pytest_terminal_summary(terminalreporter):
    errors = metrics.GRADIENT_ERRORS
    for device in ("cpu", "cuda"):
        on_device = {n: e for n, e in errors.items() if ("_cuda_" in n) == (device == "cuda")}
        for label, pick in (("fp32", lambda n: "bf16" not in n), ("bf16", lambda n: "bf16" in n)):
            chosen = {n: e for n, e in on_device.items() if pick(n)}
            if chosen:
                name = max(chosen, key=chosen.get)
                terminalreporter.write_line(f"gradient check ({label}, {device}): {len(chosen)} engine cases, "
                                            f"worst relative error {chosen[name]:.2e} ({name})")
    if os.environ.get(REPORT_ENV) and errors:
        with open(os.environ[REPORT_ENV], "w") as f:
            json.dump(errors, f, indent=1, sort_keys=True)
