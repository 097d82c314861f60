"""The code passes the project's lint configuration (pyproject.toml [tool.ruff]); CI runs it here."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_interlock.launching import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
