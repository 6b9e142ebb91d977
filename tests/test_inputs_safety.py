"""Inputs that must not hurt (issue 11): dataset paths that lead outside the dataset folder,
images too large to decode, manifests that are not UTF-8 or JSON, a method whose ``check``
raises, inputs that vanish before scoring, soft masks, uncategorised samples, conversion notes
in the edits table, tables free of machine paths, ``retry_failed=false`` and tidy progress."""
from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import methods  # noqa: F401
from harness.data import open_dataset
from harness.data.generic import GenericDataset, path_problem
from harness.images import DEFAULT_MAX_PIXELS, MASK_CONVERSIONS, load_image, load_mask
from harness.method import Method
from harness.registry import METHODS
from harness.runner import EDIT_COLUMNS, Job, JobConfig, run_job
from harness.types import CATEGORIES, DatasetError, MethodOutput, Sample, SampleError

from . import _test_methods_registry  # noqa: F401  (test_flaky)
from .conftest import DatasetBuilder, disc_mask, job_config, read_edits, read_scores, textured
from .test_data_magicbrush import H as MB_H, W as MB_W, MagicBrushBuilder
from .test_data_pie_bench import PieBuilder


@METHODS.register("test_check_raises")
class CheckRaises(Method):
    """Identity whose own ``check`` raises on samples whose id starts with ``bad``."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def check(self, sample):
        if sample.id.startswith("bad"):
            raise KeyError(f"no setting for {sample.id}")
        return None

    def edit(self, sample, seed):
        return MethodOutput(image=sample.source.copy())


def _secret(tmp_path: Path) -> Path:
    """An image outside every dataset folder: no loader may open it."""
    p = tmp_path / "outside" / "secret.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(textured(8, 8)).save(p)
    return p


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through ``open`` (Pillow and the file hashing use it), resolved."""
    seen: list[Path] = []
    real_open = builtins.open

    def spy(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)):
            seen.append(Path(file).resolve())
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


# -- 1. paths that leave the dataset folder ------------------------------------------------------
def test_path_problem_rules():
    assert path_problem("images/a.png") is None
    assert path_problem("a..b.png") is None  # '..' inside a name is not a component
    assert "absolute" in path_problem("/etc/passwd")
    assert "absolute" in path_problem("C:\\data\\a.png")
    assert "absolute" in path_problem("\\\\server\\share\\a.png")
    assert "'..'" in path_problem("images/../../a.png")
    assert "'..'" in path_problem("..\\a.png")
    assert "relative file path" in path_problem("")
    assert "relative file path" in path_problem(3)


def test_generic_paths_outside_the_folder_are_refused_before_any_file_is_opened(builder, tmp_path, opened):
    secret = _secret(tmp_path)
    builder.add_simple("good")
    builder.add_simple("abs", source=str(secret))
    builder.add_simple("dotdot", mask="../outside/secret.png")
    builder.add_simple("ref", reference="images/../../outside/secret.png")
    os.symlink(secret, builder.root / "images" / "link.png")
    builder.add_simple("link", source="images/link.png")
    (builder.root / "images" / "inner.png").symlink_to(builder.root / "images" / "good.png")
    builder.add_simple("innerlink", source="images/inner.png")  # a link that stays inside is fine
    # a folder link leading out: the file under it is a plain name, the folder is what escapes
    (builder.root / "linked").symlink_to(secret.parent, target_is_directory=True)
    builder.add_simple("dirlink", source="linked/secret.png")
    opened.clear()  # from here on the harness alone opens files
    ds = open_dataset(builder.config())
    refs = {r.id: r for r in ds.refs()}
    for sid in ("abs", "dotdot", "ref", "link", "dirlink"):
        assert ds.input_files(refs[sid]) == {}  # nothing to hash: the cache key never reads it
    errors = {p.sample_id: p for p in ds.validate()}
    assert set(errors) == {"abs", "dotdot", "ref", "link", "dirlink"}
    assert errors["abs"].field == "source" and "is absolute" in str(errors["abs"])
    assert errors["dotdot"].field == "mask" and "'..' component" in str(errors["dotdot"])
    assert errors["ref"].field == "reference"
    assert errors["link"].field == "source" and "resolves outside the dataset folder" in str(errors["link"])
    assert errors["dirlink"].field == "source" and "resolves outside the dataset folder" in str(errors["dirlink"])
    assert all(p.level == "error" for p in errors.values())
    # the whole run: failed rows naming sample and field, the others edited
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    e = read_edits(out).set_index("sample_id")
    assert out.counts == {"ok": 2, "skipped": 0, "failed": 5}
    assert e.loc["link", "reason"].startswith("sample 'link', field 'source': path 'images/link.png' resolves outside")
    assert e.loc["abs", "reason"] == (f"sample 'abs', field 'source': path {str(secret)!r} is absolute; "
                                      "dataset paths must be relative to the dataset folder")
    assert secret.resolve() not in opened
    assert all(not str(p).startswith(str(secret.parent.resolve())) for p in opened)


def test_pie_bench_image_path_outside_is_refused(tmp_path, opened):
    secret = _secret(tmp_path)
    pb = PieBuilder(tmp_path / "pie" / "data")
    pb.add("111000000000", "1")
    pb.add("111000000001", "1", image_path="../../../outside/secret.png")
    pb.add("111000000002", "1", image_path=str(secret))
    opened.clear()
    ds = open_dataset(pb.config())
    problems = {p.sample_id: p for p in ds.validate()}
    assert set(problems) == {"111000000001", "111000000002"}
    assert problems["111000000001"].field == "image_path" and "'..' component" in str(problems["111000000001"])
    assert problems["111000000002"].field == "image_path" and "absolute" in str(problems["111000000002"])
    out = run_job(job_config(pb.config(), tmp_path / "res"))
    assert out.counts == {"ok": 1, "skipped": 0, "failed": 2}
    assert secret.resolve() not in opened


def test_magicbrush_turn_files_outside_are_refused(tmp_path, opened):
    secret = _secret(tmp_path)
    mbb = MagicBrushBuilder(tmp_path / "MagicBrush" / "test")
    mbb.session("101", 2)
    mbb.sessions["101"][1]["output"] = "../../../../outside/secret.png"
    mbb.sessions["101"][0]["mask"] = str(secret)
    mbb.sessions[".."] = [dict(mbb.sessions["101"][0], mask="101-mask1.png")]
    mbb.write()
    opened.clear()
    ds = open_dataset(mbb.config())
    problems = {p.sample_id: p for p in ds.validate()}
    assert set(problems) == {"101_1", "101_2", ".._1"}
    assert problems["101_1"].field == "mask" and "absolute" in str(problems["101_1"])
    assert problems["101_2"].field == "output" and "'..' component" in str(problems["101_2"])
    assert problems[".._1"].field == "session"
    assert secret.resolve() not in opened


# -- 2. images too large, manifests not UTF-8, a raising check, inputs that vanish --------------------
def _png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height but holds 1x1 pixels of data: decoding it
    would fail as truncated, so a size refusal proves nothing was decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_a_failed_row_not_a_crash(builder, tmp_path):
    builder.add_simple("good")
    builder.add_simple("bomb")
    # 20000 x 20000 = 4e8 pixels: over twice Pillow's limit, where Image.open itself raises
    _png_declaring(builder.root / "images" / "bomb.png", 20000, 20000)
    ds = open_dataset(builder.config())
    [p] = ds.validate()
    assert (p.sample_id, p.field, p.level) == ("bomb", "source", "error")
    assert "too large to decode safely" in str(p) and f"dataset.max_pixels={DEFAULT_MAX_PIXELS}" in str(p)
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    assert out.counts == {"ok": 1, "skipped": 0, "failed": 1}
    assert "field 'source'" in read_edits(out).set_index("sample_id").loc["bomb", "reason"]


def test_max_pixels_is_a_dataset_setting_checked_before_decoding(builder, monkeypatch):
    builder.add_simple("small", h=20, w=30)  # 600 pixels
    builder.add_simple("big", h=40, w=60)  # 2400 pixels
    builder.add_simple("fake", mask=None)
    _png_declaring(builder.root / "images" / "fake.png", 50, 50)
    ds = open_dataset({**builder.config(), "max_pixels": 1000})
    assert ds.load(ds.refs()[0]).source.shape == (20, 30, 3)
    problems = {p.sample_id: str(p) for p in ds.validate()}
    assert set(problems) == {"big", "fake"}
    assert problems["big"] == ("sample 'big', field 'source': image images/big.png is 60x40 = 2400 pixels, over the "
                               "limit of 1000 (dataset.max_pixels); refused before decoding")
    assert "50x50 = 2500 pixels" in problems["fake"]  # refused from the header: never reported as truncated
    # the card sets it too; a bad value names the setting
    (builder.root / "card.yaml").write_text("name: synthetic\nmax_pixels: 500\n")
    assert open_dataset(builder.config()).max_pixels == 500
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        open_dataset({**builder.config(), "max_pixels": 0})


def test_manifest_line_not_utf8_fails_alone(builder, tmp_path):
    builder.add_simple("a")
    builder.add_simple("b")
    with open(builder.root / "manifest.jsonl", "ab") as f:
        f.write(b'{"id": "c\xff\xfe", "source": "images/a.png"}\n')
        f.write(b"[1, 2]\n")
    builder.records.append({"id": "d", "source": "images/a.png"})
    with open(builder.root / "manifest.jsonl", "a") as f:
        f.write(json.dumps(builder.records[-1]) + "\n")
    ds = open_dataset(builder.config())
    assert [r.id for r in ds.refs()] == ["a", "b", "line3", "line4", "d"]
    problems = {p.sample_id: p for p in ds.validate()}
    assert set(problems) == {"line3", "line4", "d"}  # d: no category (a warning)
    assert problems["line3"].field == "manifest" and "line 3 is not valid UTF-8 (invalid start byte at byte 9)" in str(problems["line3"])
    assert "not a JSON object" in str(problems["line4"])
    assert problems["d"].level == "warning"
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    assert out.counts == {"ok": 3, "skipped": 0, "failed": 2}


def test_annotation_files_not_utf8_are_one_clear_dataset_error(tmp_path):
    pb = PieBuilder(tmp_path / "pie" / "data")
    pb.add("111000000000", "1")
    (pb.root / "mapping_file.json").write_bytes(b'{"111000000000": {"image_path": "\xff"}}')
    with pytest.raises(ValueError, match=r"dataset 'pie_bench': mapping_file.json is not valid UTF-8 JSON: "
                                         r"'utf-8' codec can't decode byte 0xff"):
        open_dataset(pb.config()).refs()
    mbb = MagicBrushBuilder(tmp_path / "mb")
    mbb.session("101", 1)
    (mbb.root / "local_descriptions.json").write_bytes(b"\xfe{}")
    with pytest.raises(ValueError, match="local_descriptions.json is not valid UTF-8 JSON"):
        open_dataset(mbb.config()).refs()
    # a job over that dataset stops with a DatasetError (the CLI prints it on one line, exit 2)
    job = Job(JobConfig.from_mapping(job_config(mbb.config(), tmp_path / "res")))
    with pytest.raises(DatasetError, match="local_descriptions.json is not valid UTF-8 JSON"):
        job.run()
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("edit.json"))


def test_a_method_check_that_raises_fails_that_sample_only(builder, tmp_path):
    for sid in ("a", "bad1", "b"):
        builder.add_simple(sid)
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "test_check_raises"}))
    assert out.counts == {"ok": 2, "skipped": 0, "failed": 1}
    e = read_edits(out).set_index("sample_id")
    assert e.loc["bad1", "reason"] == "sample 'bad1': method 'test_check_raises' check raised KeyError: 'no setting for bad1'"
    failures = json.loads((out.job_dir / "failures.json").read_text())
    assert [f["sample_id"] for f in failures] == ["bad1"] and "KeyError" in failures[0]["traceback"]


def test_an_input_that_vanishes_before_scoring_gives_flagged_rows(builder, tmp_path):
    for sid in ("a", "b", "c"):
        builder.add_simple(sid)
    cfg = job_config(builder.config(), tmp_path / "res")
    job = Job(JobConfig.from_mapping(cfg))
    records, computed, _ = job.edit_all(job.dataset.refs())
    assert computed == 3
    moved = builder.root / "images" / "b.png"
    kept = moved.read_bytes()
    moved.unlink()  # gone between editing and scoring
    scores, scored = job.score_all(records)
    assert scored == 3
    b_key = records[1][1]
    assert {(v.metric, v.region) for v in scores[b_key]} == {(m, r) for m in ("l1", "l2")
                                                             for r in ("all", "edited", "unedited")}
    assert all(np.isnan(v.value) and v.flag == "error:SampleError:source" for v in scores[b_key])
    assert all(v.value == 0 and v.flag is None for k in (records[0][1], records[2][1]) for v in scores[k])
    errors = [e for entry in job.suite.entries for e in entry.errors]
    assert {e["sample_id"] for e in errors} == {"b"}
    assert errors[0]["error"] == "sample 'b', field 'source': file not found: images/b.png"
    # not cached: the next run, with the file back, scores it
    moved.write_bytes(kept)
    again = run_job(cfg)
    assert again.scored == 1 and again.computed == 0
    s = read_scores(again)
    assert (s.value == 0).all() and s.flag.isna().all() and len(s) == 18


def test_an_input_that_vanishes_before_set_scoring_is_left_out_and_flagged(builder, tmp_path):
    for sid in ("a", "b", "c"):
        builder.add_simple(sid)
    cfg = job_config(builder.config(), tmp_path / "res",
                     metrics={"protocol": "test", "batch_size": 2, "items": {"test_set_mean": {}}})
    job = Job(JobConfig.from_mapping(cfg))
    records, _, _ = job.edit_all(job.dataset.refs())
    (builder.root / "images" / "c.png").unlink()
    [(_, mean), (_, count)] = job.score_sets(records)
    assert (count.region, count.value, count.flag) == ("count", 2.0, "error:SampleError:source")
    assert mean.flag == "error:SampleError:source"
    assert not (job.store.root / "sets").exists()  # a partial set is never cached
    [err] = job.suite.entries[0].errors
    assert err["sample_id"] == "c" and err["error"] == "sample 'c', field 'source': file not found: images/c.png"


def test_validate_reports_every_problem_and_goes_on(builder, monkeypatch):
    builder.add_simple("ok1")
    builder.add_simple("soft")
    y, x = np.mgrid[0:48, 0:64]
    Image.fromarray(np.clip(255 - np.hypot(y - 24, x - 32) * 10, 0, 255).astype(np.uint8)).save(
        builder.root / "masks" / "soft.png")
    builder.add_simple("bomb")
    _png_declaring(builder.root / "images" / "bomb.png", 20000, 20000)
    builder.add_simple("unsafe", source="/etc/hostname")
    builder.add_simple("nocat", category=None)
    builder.add_simple("oddcat", category="recolour")
    builder.add_simple("ok2")
    # a loader bug on one sample (not a SampleError) is reported too, and the rest still checked
    real = GenericDataset.load

    def flaky_load(self, ref, decode=None):
        if ref.id == "ok2":
            raise ZeroDivisionError("division by zero")
        return real(self, ref, decode)

    monkeypatch.setattr(GenericDataset, "load", flaky_load)
    ds = open_dataset(builder.config())
    got = sorted((p.sample_id, p.field, p.level) for p in ds.validate())
    assert got == [("bomb", "source", "error"), ("nocat", "category", "warning"), ("oddcat", "category", "error"),
                   ("ok2", "?", "error"), ("soft", "mask", "error"), ("unsafe", "source", "error")]
    odd = next(p for p in ds.validate() if p.sample_id == "oddcat")
    assert "unknown category 'recolour'; known: " + ", ".join(CATEGORIES) in str(odd)


# -- 3. masks that are not binary -------------------------------------------------------------
def _soft_disc(h: int = 48, w: int = 64) -> np.ndarray:
    """An anti-aliased disc: 255 inside, 0 outside, a ramp of soft levels on its edge."""
    y, x = np.mgrid[0:h, 0:w]
    d = np.hypot(y - h / 2, x - w / 2)
    return np.clip((14 - d) * 64 + 128, 0, 255).astype(np.uint8)


def test_soft_mask_is_refused_by_default_and_converted_by_the_rule(builder):
    builder.add_simple("s")
    levels = _soft_disc()
    builder.image("masks/s.png", levels)
    soft = int(((levels > 0) & (levels < 255)).sum())
    assert soft > 20
    ds = open_dataset(builder.config())
    with pytest.raises(SampleError) as e:
        ds.load(ds.refs()[0])
    assert e.value.field == "mask" and e.value.level == "error"
    assert f"mask masks/s.png is not binary: {soft} of {48 * 64} pixels have levels strictly between 0 and 255" in str(e.value)
    assert "dataset.mask_rule=threshold" in str(e.value)
    for rule, threshold, expect in (("threshold", None, levels > 127), ("threshold", 200, levels > 200),
                                    ("nonzero", None, levels > 0)):
        cfg = {**builder.config(), "mask_rule": rule, **({"mask_threshold": threshold} if threshold else {})}
        ds = open_dataset(cfg)
        s = ds.load(ds.refs()[0])
        np.testing.assert_array_equal(s.mask, expect)
        note = s.meta[MASK_CONVERSIONS]["mask"]
        assert len(note) == 1 and note[0].startswith(f"mask: not binary ({soft} of {48 * 64} pixels soft), ")
        assert note[0].endswith(f"(mask_rule={rule})") and note == [n for n in s.meta["input_notes"] if n.startswith("mask:")]
        [w] = ds.validate()
        assert (w.sample_id, w.field, w.level) == ("s", "mask", "warning") and w.message == note[0]
    with pytest.raises(ValueError, match="mask_rule must be one of binary, threshold, nonzero"):
        open_dataset({**builder.config(), "mask_rule": "round"})
    with pytest.raises(ValueError, match="mask_threshold must be an integer in 0..254"):
        open_dataset({**builder.config(), "mask_rule": "threshold", "mask_threshold": 255})
    (builder.root / "card.yaml").write_text("name: synthetic\nmask_rule: nonzero\n")
    ds = open_dataset(builder.config())
    np.testing.assert_array_equal(ds.load(ds.refs()[0]).mask, levels > 0)


def test_rgba_mask_with_opaque_alpha_uses_its_grey_levels(tmp_path):
    disc = disc_mask(10, 12, 5, 6, 3)
    rgba = np.dstack([np.repeat((disc * 255).astype(np.uint8)[..., None], 3, 2), np.full((10, 12), 255, np.uint8)])
    p = tmp_path / "m.png"
    Image.fromarray(rgba, "RGBA").save(p)
    notes: list[str] = []
    m = load_mask(p, "s", "mask", (10, 12), notes=notes)
    np.testing.assert_array_equal(m, disc)  # not all True, as reading the alpha would give
    assert notes == ["mask: alpha channel fully opaque, grey levels used as the mask"]


def test_zero_one_mask_is_read_as_binary(tmp_path):
    disc = disc_mask(10, 12, 5, 6, 3)
    p = tmp_path / "m.png"
    Image.fromarray(disc.astype(np.uint8)).save(p)  # levels 0 and 1: not "all black"
    notes: list[str] = []
    np.testing.assert_array_equal(load_mask(p, "s", "mask", None, notes=notes), disc)
    assert notes == ["mask: levels 0/1 read as a binary mask"]
    p16 = tmp_path / "m16.png"
    Image.fromarray((disc * 65535).astype(np.uint16)).save(p16)
    np.testing.assert_array_equal(load_mask(p16, "s", "mask", None), disc)


def test_magicbrush_soft_masks_follow_mask_rule(tmp_path):
    b = MagicBrushBuilder(tmp_path / "mb")
    b.session("9", 1, mask_style="white")
    levels = _soft_disc(MB_H, MB_W)
    Image.fromarray(levels).save(b.root / "images" / "9" / "9-mask1.png")
    soft = int(((levels > 0) & (levels < 255)).sum())
    ds = open_dataset(b.config())  # MagicBrush's documented default: threshold at 127
    s = ds.load(ds.refs()[0])
    np.testing.assert_array_equal(s.mask, levels > 127)
    assert s.meta["input_notes"] == [f"mask: not binary ({soft} of {MB_H * MB_W} pixels soft), thresholded at > 127 "
                                     "(0-255 scale) (mask_rule=threshold)"]
    [w] = ds.validate()
    assert (w.sample_id, w.field, w.level) == ("9_1", "mask", "warning")
    ds_b = open_dataset(b.config(mask_rule="binary"))
    [err] = ds_b.validate()
    assert err.level == "error" and "mask images/9/9-mask1.png is not binary" in str(err)
    # the transparent convention: low alpha marks the edit, the rule mirrored
    rgba = np.dstack([textured(MB_H, MB_W), 255 - levels])
    Image.fromarray(rgba, "RGBA").save(b.root / "images" / "9" / "9-mask1.png")
    s = open_dataset(b.config()).load(ds.refs()[0])
    assert s.meta["mask_convention"] == "transparent"
    np.testing.assert_array_equal(s.mask, (255 - levels) < 128)


# -- 4. conversion notes reach the edits table ----------------------------------------------------
def test_conversion_notes_are_a_column_of_the_edits_table(builder, tmp_path):
    builder.add_simple("plain")
    builder.add_simple("rot")
    img = Image.fromarray(textured(48, 64))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(builder.root / "images" / "rot.jpg", exif=exif, quality=95)
    builder.records[-1]["source"] = "images/rot.jpg"
    builder.image("masks/rot.png", disc_mask(64, 48, 32, 24, 10))
    builder.add_simple("soft")
    builder.image("masks/soft.png", _soft_disc())
    builder.add_simple("skipme", category="add")  # skipped by inpaint: its notes are kept too
    builder.image("masks/skipme.png", _soft_disc())
    cfg = job_config({**builder.config(), "mask_rule": "threshold"}, tmp_path / "res", method={"name": "inpaint"})
    out = run_job(cfg)
    e = read_edits(out).set_index("sample_id")
    assert list(read_edits(out).columns) == EDIT_COLUMNS and "notes" in EDIT_COLUMNS
    assert e.loc["plain", "notes"] == ""
    assert e.loc["rot", "notes"] == "source: EXIF orientation 6 applied"
    soft = int(((_soft_disc() > 0) & (_soft_disc() < 255)).sum())
    note = f"mask: not binary ({soft} of 3072 pixels soft), thresholded at > 127 (0-255 scale) (mask_rule=threshold)"
    assert e.loc["soft", "notes"] == note
    assert e.loc["skipme", "status"] == "skipped" and e.loc["skipme", "notes"] == note
    # the cached rerun reads the same notes back from edit.json
    again = run_job(cfg)
    assert again.cached == 4
    pd.testing.assert_frame_equal(read_edits(again), read_edits(out))


# -- 6. no machine paths: two copies of a dataset give identical tables ------------------------------
def test_two_dataset_locations_give_identical_tables(builder, tmp_path):
    builder.add_simple("a")
    builder.add_simple("b", category="add")
    builder.add_simple("gone")
    (builder.root / "images" / "gone.png").unlink()
    builder.add_simple("trunc")
    p = builder.root / "images" / "trunc.png"
    p.write_bytes(p.read_bytes()[:80])
    builder.add_simple("soft")
    builder.image("masks/soft.png", _soft_disc())
    builder.add_simple("junk")
    (builder.root / "images" / "junk.png").write_bytes(b"not an image at all")
    copies = [tmp_path / "machine1" / "data", tmp_path / "elsewhere" / "deeper" / "data"]
    tables = []
    for i, root in enumerate(copies):
        shutil.copytree(builder.root, root)
        out = run_job(job_config({**builder.config(), "root": str(root)}, tmp_path / f"res{i}",
                                 method={"name": "inpaint"}))
        edits, scores = read_edits(out), read_scores(out)
        for col in ("reason", "notes", "flags"):
            assert not edits[col].fillna("").str.contains(str(tmp_path)).any(), col
        tables.append((out.job_dir.name, edits, scores))
    assert tables[0][0] == tables[1][0]  # the job id does not depend on where the dataset lives
    # every column but the measured costs (wall time and memory of this run, not of the inputs)
    costs = ["prep_seconds", "infer_seconds", "peak_memory_bytes"]
    pd.testing.assert_frame_equal(tables[0][1].drop(columns=costs), tables[1][1].drop(columns=costs))
    pd.testing.assert_frame_equal(tables[0][2], tables[1][2])
    e = tables[0][1].set_index("sample_id")
    assert e.loc["gone", "reason"] == "sample 'gone', field 'source': file not found: images/gone.png"
    assert e.loc["trunc", "reason"].startswith("sample 'trunc', field 'source': unreadable or truncated image images/trunc.png")
    assert e.loc["soft", "reason"].startswith("sample 'soft', field 'mask': mask masks/soft.png is not binary")
    # Pillow's own message names the file by the path it was given: replaced by the dataset's
    assert e.loc["junk", "reason"] == ("sample 'junk', field 'source': unreadable or truncated image images/junk.png: "
                                       "cannot identify image file 'images/junk.png'")
    assert list(e.status) == ["ok", "skipped", "failed", "failed", "failed", "failed"]


# -- 7. retry_failed=false ------------------------------------------------------------------
def test_retry_failed_false_keeps_failures(builder, tmp_path, monkeypatch):
    for i in range(3):
        builder.add_simple(f"s{i}")
    counter = tmp_path / "calls.txt"
    monkeypatch.setenv("TEST_FLAKY_IDS", "s1")
    monkeypatch.setenv("TEST_FLAKY_COUNTER", str(counter))
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "test_flaky"}, retry_failed=False)
    first = run_job(cfg)
    assert first.counts == {"ok": 2, "skipped": 0, "failed": 1}
    monkeypatch.setenv("TEST_FLAKY_IDS", "")  # it would succeed now, but is not retried
    second = run_job(cfg)
    assert second.counts == {"ok": 2, "skipped": 0, "failed": 1}
    assert second.computed == 0 and second.cached == 3
    assert counter.read_text().split() == ["s0", "s1", "s2"]
    assert read_edits(second).set_index("sample_id").loc["s1", "reason"] == "sample 's1': RuntimeError: boom on s1"
    third = run_job({**cfg, "retry_failed": True})  # the default retries it
    assert third.counts == {"ok": 3, "skipped": 0, "failed": 0} and third.computed == 1
    assert counter.read_text().split() == ["s0", "s1", "s2", "s1"]


def test_retry_failed_reaches_the_job_from_the_hydra_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["retry_failed=false"])
    assert JobConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True)).retry_failed is False


# -- 8. categories -------------------------------------------------------------------------
def test_samples_without_category_are_edited_by_category_free_methods(builder, tmp_path):
    builder.add_simple("nocat", category=None, target_caption="a blue thing")
    builder.add_simple("other", category="add", target_caption="a blue thing")
    for method, ok in (("inpaint", "nocat"), ("recolor", "nocat")):
        out = run_job(job_config(builder.config(), tmp_path / f"res-{method}", method={"name": method}))
        e = read_edits(out).set_index("sample_id")
        assert e.loc[ok, "status"] == "ok", (method, e.loc[ok, "reason"])
        assert e.loc["other", "status"] == "skipped" and "handles categories" in e.loc["other", "reason"]
        assert pd.isna(e.loc["nocat", "category"])


def test_unknown_category_fails_and_a_card_can_add_categories(builder, tmp_path):
    builder.add_simple("t", category="change_texture")
    out = run_job(job_config(builder.config(), tmp_path / "res"))
    reason = read_edits(out).reason[0]
    assert reason.startswith("sample 't', field 'category': unknown category 'change_texture'; known: add, remove,")
    (builder.root / "card.yaml").write_text("name: synthetic\nextra_categories: [change_texture]\n")
    ds = open_dataset(builder.config())
    assert ds.validate() == [] and ds.load(ds.refs()[0]).category == "change_texture"


def test_sample_error_level():
    e = SampleError("a", "mask", "soft", level="warning")
    assert e.level == "warning" and str(e) == "sample 'a', field 'mask': soft"
    assert SampleError("a", "b", "c").level == "error"
    back = pickle.loads(pickle.dumps(e))
    assert (back.sample_id, back.field, back.message, back.level) == ("a", "mask", "soft", "warning")
    with pytest.raises(ValueError, match="level"):
        SampleError("a", "b", "c", level="info")


# -- 9. progress ---------------------------------------------------------------------------
def _three_samples(builder):
    for sid in ("a", "b", "c"):
        builder.add_simple(sid)


def test_progress_off_a_terminal_is_a_few_plain_lines(builder, tmp_path, capfd):
    _three_samples(builder)
    run_job(job_config(builder.config(), tmp_path / "res", progress=True))
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(("edit ", "score "))]
    assert lines[0] == "edit identity: 3 edits"
    assert lines[1].startswith("edit identity: done, 3 edits in ") and lines[1].endswith("(computed 3, cached 0)")
    assert lines[2:5] == ["score identity: 6 scores", "score identity: l1 (0/6 scores done)",
                          "score identity: l2 (3/6 scores done)"]
    assert lines[5].startswith("score identity: done, 6 scores in ") and len(lines) == 6


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_names_the_metric_and_advances_per_edit(builder, tmp_path, monkeypatch):
    _three_samples(builder)
    metrics = {"protocol": "test", "regions": ["all"], "batch_size": 1, "items": {"l1": {}, "l2": {}}}
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run_job(job_config(builder.config(), tmp_path / "res", progress=True, metrics=metrics))
    assert "score identity [l1]" in term.getvalue() and "score identity [l2]" in term.getvalue()
    # what the bar is told, step by step (tqdm redraws at most every 0.1 s, so its text skips some)
    import tqdm.auto

    events: list[tuple] = []

    class Recorder:
        def __init__(self, total, desc, unit, leave):
            events.append(("open", desc, total))

        def set_description_str(self, text):
            events.append(("stage", text))

        def update(self, n):
            events.append(("update", n))

        def close(self):
            events.append(("close",))

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    run_job(job_config(builder.config(), tmp_path / "res2", progress=True, metrics=metrics))
    scoring = events[events.index(("open", "score identity", 6)):]
    per_edit = [("stage", "score identity [l1]"), ("update", 1), ("stage", "score identity [l2]"), ("update", 1)]
    assert scoring == [("open", "score identity", 6), *per_edit * 3, ("close",)]
    assert events[: events.index(("open", "score identity", 6))] == [("open", "edit identity", 3),
                                                                     *[("update", 1)] * 3, ("close",)]
