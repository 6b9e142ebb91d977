"""The one atomic writer: permissions of an ordinary file, no temporary file left behind on error,
the old content intact after a failed write, and a run folder readable by a group."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.fileio import TMP_PREFIX, atomic_write, save_bytes, save_json

from .conftest import job_config


@pytest.fixture
def umask():
    """Set the process umask for the test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_files_get_0666_less_the_umask(tmp_path, umask, mask):
    umask(mask)
    save_bytes(tmp_path / "a.bin", b"x")
    save_json(tmp_path / "sub" / "b.json", {"k": 1})
    atomic_write(tmp_path / "c.npy", lambda f: np.save(f, np.arange(3)))
    for name in ("a.bin", "sub/b.json", "c.npy"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name
    # the folder made on the way, like mkdir: 0777 less the umask
    assert _mode(tmp_path / "sub") == 0o777 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "edit.json"
    save_json(target, {"v": 1})

    def boom(f):
        f.write(b'{"v": 2, "half')  # part of the new content is on disk when it fails
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == '{\n "v": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json"]
    # not serialisable: fails before anything is written
    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_json(target, {"v": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json"]


def test_the_content_lives_under_a_temporary_name_until_the_rename(tmp_path):
    """So a writer killed before the rename leaves no partial file under the real name."""
    target = tmp_path / "edit.png"
    seen = []

    def write(f):
        f.write(b"new")
        f.flush()
        seen.append((target.exists(), [p.name for p in tmp_path.iterdir()]))

    atomic_write(target, write)
    exists, names = seen[0]
    assert not exists and len(names) == 1 and names[0].startswith(TMP_PREFIX) and names[0].endswith(".png")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["edit.png"]


def test_a_run_folder_is_group_readable_under_umask_022(builder, tmp_path, umask):
    from harness.runner import run_job

    umask(0o022)
    builder.add_simple("a")
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "inpaint"}))
    run = tmp_path / "res" / "test"
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"edit.json", "edit.png", "mask.png", "scores.parquet", "edits.parquet", "manifest.json",
            "failures.json"} <= names
    assert any(p.parent.name == "scores" for p in files)  # the per-metric score files
    for p in files:
        assert _mode(p) == 0o644, p
    assert not [p for p in run.rglob(f"{TMP_PREFIX}*")]
    assert out.counts["ok"] == 1


def test_stale_temporary_files_are_told_from_live_ones(tmp_path):
    from harness.fileio import _HOST, remove_stale_temps

    # a process of this host that has exited, one still running, and this process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f"{TMP_PREFIX}{dead.pid}~{_HOST}~aa.png",
            "live": f"{TMP_PREFIX}{live.pid}~{_HOST}~bb.png",
            "mine": f"{TMP_PREFIX}{os.getpid()}~{_HOST}~cc.json",
            "other_host_recent": f"{TMP_PREFIX}{dead.pid}~elsewhere~dd.png",
            "other_host_old": f"{TMP_PREFIX}{dead.pid}~elsewhere~ee.png",
            "old_format_old": f"{TMP_PREFIX}k3j4h5.png",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"part")
        hours_ago = time.time() - 2 * 3600
        for k in ("other_host_old", "old_format_old"):
            os.utime(tmp_path / names[k], (hours_ago, hours_ago))
        (tmp_path / "edit.png").write_bytes(b"done")  # not a temporary file: never touched
        removed = remove_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "other_host_old", "old_format_old"))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [names[k] for k in ("live", "mine", "other_host_recent")] + ["edit.png"])
        assert remove_stale_temps(tmp_path / "absent") == []
    finally:
        live.kill()
        live.wait()
