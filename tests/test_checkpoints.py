"""checkpoints.py in one process: commit markers, atomic latest, fallback to the newest complete
checkpoint, pruning, and loads that run no code. (A kill during a real multi-process save:
test_engine.py; resuming the LM recipe: test_train_lm.py.)"""
import os

import pytest
import torch

from ds_interlock import checkpoints as C


def save(root, tag, step, commit=True, files=("mp_rank_00_model_states.pt", "layer_00-model_states.pt")):
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    for name in files:
        torch.save({"w": torch.ones(3) * step}, d / name)
    if commit:
        C.commit(str(root), tag, {"global_steps": step})
    return d


def test_latest_complete_checkpoint_is_taken(tmp_path):
    save(tmp_path, "global_step2", 2)
    save(tmp_path, "global_step4", 4)
    assert (tmp_path / "latest").read_text() == "global_step4"
    assert C.resolve(str(tmp_path)) == ("global_step4", None)
    assert C.complete_tags(str(tmp_path)) == ["global_step4", "global_step2"]
    assert C.has_checkpoint(str(tmp_path)) and not C.has_checkpoint(str(tmp_path / "nothing"))


@pytest.mark.parametrize("damage,reason", [
    ("no_marker", "has no commit marker (its save did not finish)"),
    ("truncated", "bytes, the save wrote"),
    ("missing_file", "layer_00-model_states.pt is missing"),
    ("deleted_dir", "does not exist"),
    ("empty_latest", "latest is empty"),
    ("no_latest", "latest does not exist"),
    ("outside", "is not a directory name inside"),
    ("absolute", "is not a directory name inside"),
])
def test_a_damaged_newest_checkpoint_falls_back_with_the_reason(tmp_path, damage, reason):
    save(tmp_path, "global_step2", 2)
    d = save(tmp_path, "global_step4", 4, commit=damage != "no_marker")
    latest = tmp_path / "latest"
    if damage == "no_marker":
        latest.write_text("global_step4")       # what DeepSpeed's own save can leave behind
    elif damage == "truncated":
        with open(d / "layer_00-model_states.pt", "r+b") as f:
            f.truncate(10)
    elif damage == "missing_file":
        os.remove(d / "layer_00-model_states.pt")
    elif damage == "deleted_dir":
        import shutil
        shutil.rmtree(d)
    elif damage == "empty_latest":
        latest.write_text("")
    elif damage == "no_latest":
        latest.unlink()
    elif damage == "outside":
        latest.write_text("../elsewhere")
    elif damage == "absolute":
        latest.write_text(str(tmp_path / "global_step4"))
    tag, note = C.resolve(str(tmp_path))
    # a damaged step 4 leaves step 2; a bad `latest` alone leaves step 4, the newest complete one
    want = "global_step4" if damage in ("no_latest", "empty_latest", "outside", "absolute") else "global_step2"
    assert tag == want, (damage, note)
    assert reason in note and "resuming from the newest complete checkpoint" in note and want in note


def test_no_complete_checkpoint_is_an_error_naming_why(tmp_path):
    save(tmp_path, "a", 1)
    save(tmp_path, "b", 2, commit=False)
    os.remove(tmp_path / "a" / C.MARKER)
    (tmp_path / "b" / C.MARKER).write_text("{")      # something wrote markers here once
    (tmp_path / "latest").write_text("b")
    with pytest.raises(C.CheckpointError, match=r"no complete checkpoint to resume from \(.*unreadable"):
        C.resolve(str(tmp_path))
    with pytest.raises(C.CheckpointError, match="cannot load checkpoint 'b'"):
        C.resolve(str(tmp_path), "b")


def test_checkpoints_without_markers_load_as_deepspeed_would(tmp_path):
    save(tmp_path, "global_step3", 3, commit=False)
    (tmp_path / "latest").write_text("global_step3")
    tag, note = C.resolve(str(tmp_path))
    assert tag == "global_step3" and "stock DeepSpeed or an older ds_interlock" in note
    assert C.resolve(str(tmp_path), "global_step3")[0] == "global_step3"


def test_prune_keeps_the_newest_and_removes_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, f"global_step{step}", step)
        os.utime(tmp_path / f"global_step{step}" / C.MARKER, (step, step))   # committed in step order
    old = save(tmp_path, "global_step0", 0, commit=False)           # a kill's leftover of ours, older
    C.begin(str(tmp_path), "global_step0")
    os.utime(old, (0.5, 0.5))
    stock = save(tmp_path, "stock_step9", 9, commit=False)          # no marker, no sentinel: the user's
    os.utime(stock, (0.5, 0.5))
    (tmp_path / "notes").mkdir()                                      # not a checkpoint: untouched
    removed = C.prune(str(tmp_path), keep=2)
    assert sorted(removed) == ["global_step0", "global_step1", "global_step2"]
    assert sorted(os.listdir(tmp_path)) == ["global_step3", "global_step4", "latest", "notes", "stock_step9"]
    assert C.prune(str(tmp_path), keep=0) == ["global_step3"]        # never the newest complete one


def test_prune_after_a_rollback_keeps_what_was_just_saved(tmp_path):
    save(tmp_path, "global_step3100", 3100)
    os.utime(tmp_path / "global_step3100" / C.MARKER, (1, 1))
    save(tmp_path, "global_step1100", 1100)                         # resumed from 1000, saved again
    assert C.prune(str(tmp_path), keep=1, protect="global_step1100") == ["global_step3100"]
    assert C.resolve(str(tmp_path)) == ("global_step1100", None)


def test_saving_a_tag_again_makes_it_incomplete_until_committed(tmp_path):
    save(tmp_path, "last", 1)
    C.begin(str(tmp_path), "last")       # a new save of the same tag starts; a kill now must not leave it "complete"
    assert "no commit marker" in C.why_incomplete(str(tmp_path), "last")
    C.commit(str(tmp_path), "last", {"global_steps": 2})
    assert C.why_incomplete(str(tmp_path), "last") is None
    assert not (tmp_path / "last" / C.SAVING).exists()
    with pytest.raises(ValueError, match="plain JSON"):
        C.checked_facts({"data": tmp_path})


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = "/tmp/ds_interlock_payload_ran"


def test_loads_run_no_code(tmp_path, monkeypatch):
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    path = tmp_path / "aux_head_00-model_states.pt"
    torch.save({"weight": torch.ones(2), "x": Payload()}, path)
    with pytest.raises(C.CheckpointError, match=r"aux_head_00-model_states.pt: refused to load: it refers to .*system"):
        C.safe_load(str(path))
    assert not os.path.exists(SENTINEL)
    monkeypatch.setenv(C.TRUST_ENV, "1")          # the user's explicit trust
    C.safe_load(str(path))
    assert os.path.exists(SENTINEL)
    os.remove(SENTINEL)


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:50])
    with pytest.raises(C.CheckpointError, match="mp_rank_00_model_states.pt: cannot be read, the file is damaged"):
        C.safe_load(str(path))
    path.write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="damaged or incomplete"):
        C.safe_load(str(path))
    pickle_path = tmp_path / "plain.pt"
    torch.save({"a": 1, "b": [torch.zeros(1)]}, pickle_path)
    assert C.safe_load(str(pickle_path))["a"] == 1


def test_tags_are_plain_names():
    assert C.valid_tag("global_step10") and C.valid_tag("ckpt")
    for bad in ("", ".", "..", "../x", "/abs", "a/b", ".hidden", None, 3):
        assert not C.valid_tag(bad), bad


def test_another_pipeline_layout_is_named():
    with pytest.raises(C.CheckpointError, match=r"was written with num_stages 4 \(now 2\)"):
        C.check_layout("ckpt/a", {"num_stages": 4, "data_parallel": 1}, {"num_stages": 2, "data_parallel": 2})
    C.check_layout("ckpt/a", {"num_stages": 2, "data_parallel": 1}, {"num_stages": 2, "data_parallel": 2})
    with pytest.raises(C.CheckpointError, match="data_parallel 1 \\(now 2\\).*with ZeRO"):
        C.check_layout("ckpt/a", {"num_stages": 2, "data_parallel": 1}, {"num_stages": 2, "data_parallel": 2}, zero=True)
    C.check_layout("ckpt/a", None, {"num_stages": 2})     # no marker: nothing to compare
