"""Temp names that say who wrote them, so that a later start can remove a killed build's leftovers."""

import os
import time

from ds_interlock.data import cache


def test_temp_names_carry_host_and_pid_and_only_temps_are_removed(tmp_path):
    target = tmp_path / "tokens" / "train-abc.bin"
    tmp_file = cache.temp_path_for(target)
    m = cache._TEMP_NAME.match(tmp_file.name)
    assert m and m["host"] == cache._HOST and int(m["pid"]) == os.getpid()
    tmp_dir = cache.make_temp_dir_beside(tmp_path / "extracted" / "release")
    assert tmp_dir.is_dir() and cache._TEMP_NAME.match(tmp_dir.name)
    # A live writer's temps stay however old; finished entries are never touched.
    old = time.time() - 10 * cache.STALE_TEMP_SECONDS
    tmp_file.parent.mkdir(parents=True)
    tmp_file.write_bytes(b"x")
    (tmp_path / "tokens" / "train-abc.bin").write_bytes(b"x")
    (tmp_path / "tokens" / ".hidden-but-final").write_bytes(b"x")
    for p in (tmp_path / "tokens").iterdir():
        os.utime(p, (old, old))
    assert cache.remove_stale_temps(tmp_path / "tokens") == []
    assert cache.remove_stale_temps(tmp_path / "missing") == []
    # Another host's temp goes once untouched for long enough, not before.
    foreign = tmp_path / "tokens" / ".train-abc.bin.tmp-elsewhere-42-0123abcd"
    foreign.write_bytes(b"x")
    assert cache.stale_temp_reason(foreign) is None
    os.utime(foreign, (old, old))
    assert cache.remove_stale_temps(tmp_path / "tokens") == [(foreign, "untouched for 150 min")]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [
        ".hidden-but-final", tmp_file.name, "train-abc.bin"]


def test_sampled_digest_sees_size_and_content(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 4096)
    d = cache.sampled_digest(p)
    assert cache.sampled_digest(p) == d
    p.write_bytes(bytes(range(256)) * 4096 + b"\0")
    assert cache.sampled_digest(p) != d
    p.write_bytes(b"\1" + (bytes(range(256)) * 4096)[1:])      # same size, first byte changed
    assert cache.sampled_digest(p) != d
