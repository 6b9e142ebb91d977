"""The edit cache, through the real runner: each part of an edit's key recomputes exactly the
edits it concerns (and nothing else, and nothing when unchanged); input files by content; a
cache_dir shared by two runs; a process killed between edit.png and edit.json, or inside a write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import methods  # noqa: F401
from harness import versions
from harness.cache import EditStore
from harness.data import generic
from harness.fileio import TMP_PREFIX
from harness.runner import run_job
from methods.inpaint import Inpaint

from .conftest import REPO, disc_mask, job_config, textured

IDS = ("a", "b", "c")
# Sample "a" has every kind of input file; BMP keeps a file's size when its pixels change, so a
# replacement "in place" below can also keep the size and the mtime: only the bytes differ.
FILE_FIELDS = ("source", "target", "mask", "reference", "reference_mask")


def _dataset(builder) -> None:
    for i, sid in enumerate(IDS):
        extra = {}
        if sid == "a":
            extra = {
                "target": builder.image("images/a_target.bmp", textured(48, 64, 10)),
                "reference": builder.image("images/a_ref.bmp", textured(20, 24, 11)),
                "reference_mask": builder.image("masks/a_refmask.bmp", disc_mask(20, 24, 10, 12, 6)),
            }
        builder.add_simple(sid, seed=i, **extra)
    rec = builder.records[0]
    rec["source"] = builder.image("images/a.bmp", textured(48, 64, 0))
    rec["mask"] = builder.image("masks/a.bmp", disc_mask(48, 64, 24, 32, 12))
    builder.write()


def _keys(outcome) -> dict[str, str]:
    e = pd.read_parquet(outcome.job_dir / "edits.parquet")
    assert (e.status == "ok").all(), e.reason.tolist()
    return dict(zip(e.sample_id, e.edit_key))


def _replace_in_place(path: Path) -> None:
    """New pixels, same byte size, same mtime (ctime moves: it cannot be set)."""
    st = path.stat()
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im).copy()
    arr[0, 0] = 255 - arr[0, 0]  # one pixel
    with open(path, "r+b") as f:  # same inode: rewritten, not replaced by a rename
        from io import BytesIO

        buf = BytesIO()
        Image.fromarray(arr).save(buf, format="BMP")
        assert len(buf.getvalue()) == st.st_size
        f.write(buf.getvalue())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def base(builder, tmp_path):
    _dataset(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "inpaint", "radius": 3}, score=False)
    first = run_job(cfg)
    assert first.computed == len(IDS) and first.counts["ok"] == len(IDS)
    return builder, cfg, _keys(first)


def test_nothing_changed_or_only_mtimes_touched_recomputes_nothing(base):
    builder, cfg, keys = base
    again = run_job(cfg)
    assert again.computed == 0 and again.cached == len(IDS) and _keys(again) == keys
    later = time.time() + 5
    for p in builder.root.rglob("*"):
        if p.is_file():
            os.utime(p, (later, later))
    touched = run_job(cfg)
    assert touched.computed == 0 and _keys(touched) == keys


def _change_params(cfg, builder, monkeypatch):
    return {**cfg, "method": {"name": "inpaint", "radius": 4}}


def _change_method_version(cfg, builder, monkeypatch):
    monkeypatch.setattr(Inpaint, "version", "2")
    return cfg


def _change_model_revision(cfg, builder, monkeypatch):
    monkeypatch.setattr(Inpaint, "model_revision", lambda self: "rev-2")
    return cfg


def _change_dataset_version(cfg, builder, monkeypatch):
    card = builder.root / "card.yaml"
    card.write_text(card.read_text().replace("version: 1", "version: 2"))
    return cfg


def _change_seed(cfg, builder, monkeypatch):
    return {**cfg, "seed": 1}


def _bump_version(monkeypatch, library):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: "0.0.1-other" if name == library else real(name))


def _change_opencv(cfg, builder, monkeypatch):
    # the library inpaint's numerics come from (cv2.inpaint), read once per process
    _bump_version(monkeypatch, "opencv")
    return cfg


def _change_pillow(cfg, builder, monkeypatch):
    # every method's input is decoded by Pillow
    _bump_version(monkeypatch, "pillow")
    return cfg


@pytest.mark.parametrize("change", [_change_params, _change_method_version, _change_model_revision,
                                    _change_dataset_version, _change_seed, _change_opencv, _change_pillow],
                         ids=lambda f: f.__name__[len("_change_"):])
def test_each_job_wide_key_part_recomputes_every_edit_once(base, monkeypatch, change):
    builder, cfg, keys = base
    changed_cfg = change(cfg, builder, monkeypatch)
    changed = run_job(changed_cfg)
    new = _keys(changed)
    assert changed.computed == len(IDS) and changed.cached == 0
    assert all(new[s] != keys[s] for s in IDS) and len(set(new.values())) == len(IDS)
    again = run_job(changed_cfg)
    assert again.computed == 0 and _keys(again) == new
    monkeypatch.undo()
    if change is _change_dataset_version:
        card = builder.root / "card.yaml"
        card.write_text(card.read_text().replace("version: 2", "version: 1"))
    back = run_job(cfg)  # the original edits are still there
    assert back.computed == 0 and _keys(back) == keys


def test_a_changed_manifest_entry_recomputes_that_sample_only(base):
    builder, cfg, keys = base
    builder.records[1]["instruction"] = "remove the other thing"
    builder.write()
    out = run_job(cfg)
    new = _keys(out)
    assert out.computed == 1 and out.cached == 2
    assert new["b"] != keys["b"] and all(new[s] == keys[s] for s in ("a", "c"))


@pytest.mark.parametrize("field", FILE_FIELDS)
def test_an_input_file_replaced_in_place_recomputes_its_sample_only(base, field):
    builder, cfg, keys = base
    path = builder.root / builder.records[0][field]
    st = path.stat()
    _replace_in_place(path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    out = run_job(cfg)
    new = _keys(out)
    assert out.computed == 1 and out.cached == 2
    assert new["a"] != keys["a"] and all(new[s] == keys[s] for s in ("b", "c"))
    assert run_job(cfg).computed == 0


def test_a_moved_dataset_folder_keeps_its_keys(base, tmp_path):
    builder, cfg, keys = base
    moved = tmp_path / "moved"
    builder.root.rename(moved)
    out = run_job({**cfg, "dataset": {**cfg["dataset"], "root": str(moved)}})
    assert out.computed == 0 and _keys(out) == keys


# -- input file digests ---------------------------------------------------------------------------
def _rel(p) -> str:
    return f"{Path(p).parent.name}/{Path(p).name}"


@pytest.fixture
def count_hashes(monkeypatch):
    generic._DIGESTS.clear()
    calls: list[str] = []
    real = generic._sha256_file

    def counting(p):
        calls.append(_rel(p))
        return real(p)

    monkeypatch.setattr(generic, "_sha256_file", counting)
    yield calls
    generic._DIGESTS.clear()


def test_each_input_file_is_hashed_once_per_process(builder, count_hashes, monkeypatch):
    _dataset(builder)
    ds = generic.GenericDataset(builder.root)
    real_clock = time.time
    monkeypatch.setattr(generic, "_clock", lambda: real_clock() + 60)  # files older than RACY_SECONDS
    refs = ds.refs()
    first = [ds.fingerprint(r) for r in refs]
    assert [ds.fingerprint(r) for r in refs] == first
    files = [_rel(f) for r in refs for f in ds.input_files(r).values()]
    assert len(files) == len(FILE_FIELDS) + 2 * 2  # a: five files; b, c: source and mask
    assert sorted(count_hashes) == sorted(files)  # once each, though asked twice
    # a file rewritten in place later (same size, mtime set back): its ctime moved, so hashed again
    a_source = builder.root / builder.records[0]["source"]
    time.sleep(0.05)  # past a tick of the file system's coarse clock
    _replace_in_place(a_source)
    count_hashes.clear()
    assert ds.fingerprint(refs[0]) != first[0] and count_hashes == [_rel(a_source)]
    # touched only: hashed again, same fingerprint
    changed = ds.fingerprint(refs[0])
    later = real_clock() + 5
    os.utime(a_source, (later, later))
    count_hashes.clear()
    assert ds.fingerprint(refs[0]) == changed and count_hashes == [_rel(a_source)]


def test_a_just_written_file_is_always_hashed_again(builder, count_hashes, monkeypatch):
    """Git's "racy" rule: a rewrite within one tick of the file system's clock can keep every
    stat field (size, mtime, ctime, inode) of the file it replaces, so a file changed less than
    RACY_SECONDS ago is hashed each time. Here os.stat is frozen: that worst case, for sure."""
    import types

    _dataset(builder)
    ds = generic.GenericDataset(builder.root)
    ref = ds.refs()[0]
    frozen = {}

    def stat(p, *a, **k):
        key = str(p)
        if key not in frozen:
            frozen[key] = os.stat(p, *a, **k)
        return frozen[key]

    monkeypatch.setattr(generic, "os", types.SimpleNamespace(stat=stat))
    before = ds.fingerprint(ref)
    _replace_in_place(builder.root / builder.records[0]["source"])
    assert ds.fingerprint(ref) != before
    assert count_hashes.count("images/a.bmp") == 2
    # the same files seen as older than RACY_SECONDS are cached: the rewrite would go unseen
    monkeypatch.setattr(generic, "_clock", lambda: time.time() + 60)
    cached = ds.fingerprint(ref)
    _replace_in_place(builder.root / builder.records[0]["source"])
    assert ds.fingerprint(ref) == cached


def test_missing_and_unreadable_files_are_part_of_the_fingerprint(builder):
    _dataset(builder)
    ds = generic.GenericDataset(builder.root)
    ref = ds.refs()[1]
    present = ds.fingerprint(ref)
    src = builder.root / builder.records[1]["source"]
    src.rename(src.with_suffix(".gone"))
    assert generic.file_digest(src) == "missing" and ds.fingerprint(ref) != present


# -- library versions -----------------------------------------------------------------------------
def test_library_versions_are_the_installed_ones_per_method():
    from importlib import metadata

    from methods._diffusion_common import DiffusionMethod
    from methods.identity import Identity
    from methods.sdedit import SDEdit

    classical = Identity.library_versions()
    assert set(classical) == {"numpy", "pillow", "opencv", "scipy", "scikit-image"}
    assert classical["numpy"] == metadata.version("numpy") and classical["scipy"] == metadata.version("scipy")
    assert classical["opencv"] == metadata.version("opencv-python-headless")
    diffusion = SDEdit.library_versions()
    assert issubclass(SDEdit, DiffusionMethod)
    assert set(diffusion) == {"numpy", "pillow", "opencv", "torch", "diffusers", "transformers"}
    assert diffusion["diffusers"] == metadata.version("diffusers")
    assert diffusion["torch"] == metadata.version("torch")
    assert versions.installed_version("no-such-distribution-xyz") is None


# -- a cache shared by two runs ------------------------------------------------------------------
def test_two_runs_sharing_a_cache_dir(builder, tmp_path):
    _dataset(builder)
    shared = tmp_path / "shared-cache"
    outs = []
    for name in ("first", "second"):
        cfg = job_config(builder.config(), tmp_path / "res", method={"name": "inpaint"}, run_name=name,
                         cache_dir=str(shared))
        outs.append(run_job(cfg))
    first, second = outs
    assert first.computed == len(IDS) and first.scored == len(IDS)
    assert second.computed == 0 and second.cached == len(IDS) and second.scored == 0
    assert first.job_dir != second.job_dir
    assert not (tmp_path / "res" / "first" / "edits").exists()  # everything went to the shared folder
    for table in ("edits.parquet", "scores.parquet"):
        a, b = (pd.read_parquet(o.job_dir / table) for o in outs)
        assert (a.run == "first").all() and (b.run == "second").all()
        pd.testing.assert_frame_equal(a.drop(columns="run"), b.drop(columns="run"))
    assert len(list(shared.rglob("edit.json"))) == len(IDS)


# -- killed writers ---------------------------------------------------------------------------------
_KILL_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import methods
from harness import cache, fileio
from harness.images import encode_png
from harness.runner import run_job

cfg, where, nth = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_json, real_png = cache.save_json, cache.save_png
seen = {{"png": 0}}

def save_json(path, obj):
    if where == "before_json" and path.name == "edit.json" and obj.get("sample_id") == "s%d" % nth:
        assert (path.parent / "edit.png").is_file()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_json(path, obj)

def save_png(path, arr):
    if where == "inside_png" and path.name == "edit.png":
        seen["png"] += 1
        if seen["png"] == nth + 1:
            data = encode_png(arr)
            def half(f):
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            fileio.atomic_write(path, half)
    return real_png(path, arr)

cache.save_json, cache.save_png = save_json, save_png
run_job(cfg)
"""


def _killed_then_resumed(builder, tmp_path, where: str):
    n, nth = 5, 2
    for i in range(n):
        builder.add_simple(f"s{i}", seed=i)
    method = {"name": "inpaint"}
    cfg = job_config(builder.config(), tmp_path / "killed", method=method, writers=0)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(repo=str(REPO)), json.dumps(cfg), where, str(nth)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = EditStore(tmp_path / "killed" / "test" / "edits")
    folders = sorted(p for p in store.root.glob("*/*") if p.is_dir())
    assert len(folders) == nth + 1  # s0, s1 done; s2 interrupted
    done = [f for f in folders if (f / "edit.json").is_file()]
    assert len(done) == nth
    (cut,) = [f for f in folders if f not in done]
    left = sorted(p.name for p in cut.iterdir())
    resumed = run_job(cfg)
    assert resumed.cached == nth and resumed.computed == n - nth
    clean = run_job(job_config(builder.config(), tmp_path / "clean", method=method, writers=0))
    # complete edits, as an uninterrupted run made them, and nothing else
    for folder in sorted(p for p in store.root.glob("*/*") if p.is_dir()):
        assert sorted(p.name for p in folder.iterdir()) == ["edit.json", "edit.png", "mask.png", "scores"]
        assert not list(folder.rglob(f"{TMP_PREFIX}*"))
        twin = tmp_path / "clean" / "test" / "edits" / folder.relative_to(store.root)
        assert (folder / "edit.png").read_bytes() == (twin / "edit.png").read_bytes()
    assert (resumed.job_dir / "scores.parquet").read_bytes() == (clean.job_dir / "scores.parquet").read_bytes()
    return left


def test_killed_between_edit_png_and_edit_json(builder, tmp_path):
    left = _killed_then_resumed(builder, tmp_path, "before_json")
    assert left == ["edit.png", "mask.png"]  # an image, but no edit.json: not an edit


def test_killed_inside_a_write_leaves_a_temporary_file_the_rerun_removes(builder, tmp_path):
    left = _killed_then_resumed(builder, tmp_path, "inside_png")
    assert len(left) == 1 and left[0].startswith(TMP_PREFIX) and left[0].endswith(".png")
