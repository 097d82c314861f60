"""The core installs and imports with torch and DeepSpeed alone; the LM recipe is the [lm] extra."""
import configparser
import os
import subprocess
import sys

from ds_interlock.launching import ROOT

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "datasets", "sentencepiece", "matplotlib", "pandas"):
            raise ImportError(f"{name} is not part of the core install")
sys.meta_path.insert(0, Block())
"""


def test_core_needs_only_torch_and_deepspeed():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    requires = [line.split(">")[0].split("=")[0].split("<")[0].strip()
                for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    assert requires == ["torch", "deepspeed"]
    code = BLOCK + (
        "from ds_interlock import initialize, InterlockingPipelineModule, InProcessPipeline\n"
        "import ds_interlock.engine, ds_interlock.commcheck, ds_interlock.replay, ds_interlock.simulate\n"
        "print('core ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]
