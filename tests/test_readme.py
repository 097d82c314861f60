"""The README's commands and code run as written (the Python example on CPU, two steps)."""
import os
import re

from ds_interlock.launching import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_single_device_example_runs(tmp_path, monkeypatch):
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme(), re.S) if "InProcessPipeline(" in b)
    code = block.replace('devices="cuda"', 'devices="cpu"').replace("range(100)", "range(2)")
    assert code != block
    monkeypatch.chdir(ROOT)
    code = code.replace('"ckpt"', repr(str(tmp_path / "ckpt")))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["pipe"].stage_losses) == 4 and scope["pipe"].global_steps == 2   # loaded back at step 2


def test_commands_name_existing_files():
    text = readme()
    for path in set(re.findall(r"(?:examples|benchmarks|ds_configs|docs)/[\w./-]+\.(?:py|json|md|png)", text)):
        assert os.path.exists(os.path.join(ROOT, path)), path
