"""The TEdBench loader (format tedbench) and Imagic's published results scored as a method
(method=tedbench_results), on tiny parquet files written here in the dataset's schema (one split,
val; image columns as HF's {"bytes", "path"} structs; column names as harness/data/tedbench.py
states them)."""
from __future__ import annotations

import hashlib

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import methods.tedbench_results  # noqa: F401  (registers the method until methods/__init__ imports it)
from harness.data import open_dataset
from harness.data.tedbench import TEdBenchDataset, sample_id
from harness.registry import DATASET_FORMATS, METHODS
from harness.types import DatasetError, SampleError, SkipSample

from .conftest import REPO, textured

H, W = 48, 64
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TEXTS = ["A photo of a sitting dog.", "A bird spreading its wings.", "A photo of a horse jumping."]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def row(i: int, **over) -> dict:
    """One row in TEdBench's schema; Imagic's "result" is the negative of the source, at 2x size
    (Imagic's outputs are not at the input's size)."""
    src = textured(H, W, seed=i)
    res = np.repeat(np.repeat(255 - src, 2, axis=0), 2, axis=1)
    r = {"original_image": {"bytes": png(src), "path": f"{i}.png"},
         "caption": TEXTS[i % len(TEXTS)],
         "edited_image": {"bytes": png(res), "path": f"{i}_imagic.png"}}
    r.update(over)
    return r


def write_parquet(path: Path, rows: list[dict], rename: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rename = rename or {}
    arrays, names = [], []
    for c in rows[0]:
        values = [r.get(c) for r in rows]
        typ = IMAGE_STRUCT if c in ("original_image", "edited_image") else (
            pa.string() if all(v is None or isinstance(v, str) for v in values) else None)
        arrays.append(pa.array(values, type=typ))
        names.append(rename.get(c, c))
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    return path


@pytest.fixture()
def bench(tmp_path) -> Path:
    """The downloaded-folder layout: data/val-00000-of-00001.parquet with 3 rows."""
    root = tmp_path / "tedbench"
    write_parquet(root / "data" / "val-00000-of-00001.parquet", [row(i) for i in range(3)])
    return root


def card(root: Path, **over) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "dataset" / "tedbench.yaml").read_text())
    cfg.update(root=str(root), **over)
    return cfg


# -- reading the published layout ----------------------------------------------------------------
def test_reads_every_row_with_its_target_text_and_no_mask_category_or_source_caption(bench):
    ds = open_dataset(card(bench))
    assert isinstance(ds, TEdBenchDataset) and ds.name == "tedbench"
    refs = ds.refs()
    assert [r.id for r in refs] == ["tedbench_000", "tedbench_001", "tedbench_002"]
    assert all(r.error is None and r.category is None for r in refs)
    for i, ref in enumerate(refs):
        s = ds.load(ref)
        assert s.id == sample_id(i) and s.dataset == "tedbench"
        np.testing.assert_array_equal(s.source, textured(H, W, seed=i))  # PNG bytes decoded exactly
        assert s.target_caption == TEXTS[i]
        assert s.source_caption is None and s.mask is None and s.category is None and s.target is None
        assert s.instruction is None
        assert s.meta == {"row": i, "source_caption_rule": "none"}
        assert s.missing(["source_caption", "mask"]) == ["source_caption", "mask"]
    # the format has no categories: no "no category" warning for its 100 uncategorised samples
    assert ds.validate() == []


def test_empty_source_caption_rule_gives_the_null_prompt(bench):
    ds = open_dataset(card(bench, source_caption_rule="empty"))
    s = ds.load(ds.refs()[0])
    assert s.source_caption == "" and s.missing(["source_caption"]) == []
    assert s.meta["source_caption_rule"] == "empty"
    # the rule is in the fingerprint: an edit made with "" is not an edit made without a caption
    none = open_dataset(card(bench))
    assert ds.fingerprint(ds.refs()[0]) != none.fingerprint(none.refs()[0])
    with pytest.raises(ValueError, match=r"dataset 'tedbench': source_caption_rule must be one of none, empty, "
                                         r"got 'blip'"):
        open_dataset(card(bench, source_caption_rule="blip"))


def test_one_parquet_file_as_root_and_subsets(bench):
    f = bench / "data" / "val-00000-of-00001.parquet"
    ds = open_dataset(card(f, limit=2))
    assert [r.id for r in ds.refs()] == ["tedbench_000", "tedbench_001"]
    ds = open_dataset(card(bench, ids=["tedbench_002"]))
    assert [r.id for r in ds.refs()] == ["tedbench_002"]
    every = [r.id for r in open_dataset(card(bench)).refs()]
    for i in range(2):  # shard i of n: the ids whose sha1 is i mod n
        assert [r.id for r in open_dataset(card(bench, shard=f"{i}/2")).refs()] == [
            x for x in every if int(hashlib.sha1(x.encode()).hexdigest(), 16) % 2 == i]


def test_other_column_names_are_parameters(tmp_path):
    root = tmp_path / "renamed"
    write_parquet(root / "val.parquet", [row(0)], rename={"original_image": "image", "caption": "text"})
    with pytest.raises(DatasetError, match=r"val.parquet: no column\(s\) original_image, caption \(the file has "
                                           r"image, text, edited_image\); set dataset.image_column"):
        open_dataset(card(root)).refs()
    ds = open_dataset(card(root, image_column="image", text_column="text"))
    s = ds.load(ds.refs()[0])
    np.testing.assert_array_equal(s.source, textured(H, W, seed=0))
    assert s.target_caption == TEXTS[0]


def test_bad_rows_fail_alone_naming_sample_and_column(tmp_path):
    root = tmp_path / "bad"
    write_parquet(root / "data" / "val-0.parquet", [
        row(0), row(1, caption=None), row(2, caption="  "),
        row(3, original_image={"bytes": b"not an image", "path": "3.png"}),
        row(4, original_image={"bytes": None, "path": "../outside.png"}),
    ])
    ds = open_dataset(card(root))
    refs = ds.refs()
    assert [r.id for r in refs] == [sample_id(i) for i in range(5)]
    assert ds.load(refs[0]).target_caption == TEXTS[0]
    problems = {e.sample_id: str(e) for e in ds.validate()}
    assert set(problems) == {"tedbench_001", "tedbench_002", "tedbench_003", "tedbench_004"}
    assert "field 'caption'" in problems["tedbench_001"] and "missing (null)" in problems["tedbench_001"]
    assert "field 'caption'" in problems["tedbench_002"] and "empty text" in problems["tedbench_002"]
    assert "field 'original_image'" in problems["tedbench_003"] and "not a readable image" in problems["tedbench_003"]
    assert "field 'original_image'" in problems["tedbench_004"] and ".." in problems["tedbench_004"]
    assert not (tmp_path / "outside.png").exists()


def test_a_replaced_image_changes_the_fingerprint(bench):
    ds = open_dataset(card(bench))
    before = [ds.fingerprint(r) for r in ds.refs()]
    rows = [row(0), row(1, original_image={"bytes": png(textured(H, W, seed=9)), "path": "1.png"}), row(2)]
    write_parquet(bench / "data" / "val-00000-of-00001.parquet", rows)
    ds = open_dataset(card(bench))
    after = [ds.fingerprint(r) for r in ds.refs()]
    assert after[0] == before[0] and after[1] != before[1] and after[2] == before[2]


def test_missing_copy_says_how_to_obtain_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"TEdBench not found: .*nowhere.*how to obtain dataset 'tedbench' "
                                                r"\(set dataset.root=PATH to point at it\): .*huggingface-cli download "
                                                r"bahjat-kawar/tedbench"):
        open_dataset(card(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no parquet file of split 'val'"):
        open_dataset(card(tmp_path / "empty"))
    assert DATASET_FORMATS.get("tedbench") is TEdBenchDataset


# -- Imagic's results as a method ------------------------------------------------------------------
def test_tedbench_results_returns_imagics_image_resized_to_the_source(bench):
    m = METHODS.get("tedbench_results").from_config({"path": str(bench)})
    ds = open_dataset(card(bench))
    for ref in ds.refs():
        s = ds.load(ref)
        out = m.edit(s, seed=0)
        # a 2x nearest upscale of the negative, Lanczos-resized back: the negative within the filter's
        # ringing at the texture's edges (a mean bound: Lanczos is not an exact inverse of pixel repetition)
        assert out.image.shape == s.source.shape and out.image.dtype == np.uint8
        err = np.abs(out.image.astype(int) - (255 - s.source).astype(int))
        assert err.mean() < 8.0
        assert out.info == {"column": "edited_image", "resized_from": [2 * W, 2 * H]}
    strict = METHODS.get("tedbench_results").from_config({"path": str(bench), "resize": False})
    s = ds.load(ds.refs()[0])
    with pytest.raises(SampleError, match=r"sample 'tedbench_000', field 'edited_image': Imagic's result is 128x96 "
                                          r"\(WxH\) but the source is 64x48"):
        strict.edit(s, 0)
    rev = m.model_revision()
    assert len(rev) == 16 and rev == METHODS.get("tedbench_results").from_config({"path": str(bench)}).model_revision()


def test_tedbench_results_same_size_is_exact_and_missing_rows_skip(tmp_path):
    root = tmp_path / "same"
    rows = [row(0, edited_image={"bytes": png(255 - textured(H, W, seed=0)), "path": "0.png"}),
            row(1, edited_image=None)]
    write_parquet(root / "data" / "val-0.parquet", rows)
    m = METHODS.get("tedbench_results").from_config({"path": str(root)})
    ds = open_dataset(card(root))
    s0, s1 = (ds.load(r) for r in ds.refs())
    out = m.edit(s0, 0)
    np.testing.assert_array_equal(out.image, 255 - s0.source)
    assert out.info == {"column": "edited_image"}
    with pytest.raises(SkipSample, match=r"TEdBench row of sample 'tedbench_001' has no 'edited_image' image"):
        m.edit(s1, 0)
    with pytest.raises(SkipSample, match=r"TEdBench copy 'same' has no row for sample 'tedbench_007'"):
        m.edit(dataclasses.replace(s0, id="tedbench_007"), 0)
    with pytest.raises(ValueError, match=r"'path' \(the TEdBench copy"):
        METHODS.get("tedbench_results").from_config({})
    with pytest.raises(DatasetError, match=r"no column\(s\) imagic"):
        METHODS.get("tedbench_results").from_config({"path": str(root), "result_column": "imagic"}).edit(s0, 0)


def test_tedbench_results_yaml_and_the_command_of_its_comment(bench):
    from harness.cli import check_jobs

    jobs = check_jobs(["dataset=tedbench", f"dataset.root={bench}", "method=tedbench_results",
                       f"method.path={bench}", "metrics=cpam"], multirun=False)
    (cfg,) = jobs.configs
    assert cfg["method"] == {"name": "tedbench_results", "path": str(bench), "result_column": "edited_image",
                             "resize": True, "label": "Imagic (published, Imagen)"}
    assert cfg["dataset"]["name"] == "tedbench" and cfg["dataset"]["format"] == "tedbench"
    assert cfg["metrics"]["protocol"] == "cpam"
    conf = yaml.safe_load((REPO / "conf" / "method" / "tedbench_results.yaml").read_text())
    params = dataclasses.asdict(METHODS.get("tedbench_results").Params(path="x"))
    assert conf == {"name": "tedbench_results", **params, "path": ""}


def test_a_run_scores_imagics_results_and_flags_the_missing_mask(bench, tmp_path):
    """`edit-harness run dataset=tedbench method=tedbench_results`: every row edited (Imagic's image,
    resized), scored on the whole image; the edited / unedited regions are NaN flagged no_mask
    (TEdBench has no masks)."""
    import pandas as pd

    from harness.cli import main

    rc = main(["run", "dataset=tedbench", f"dataset.root={bench}", "method=tedbench_results", f"method.path={bench}",
               "metrics=pixel", f"results_dir={tmp_path}", "run_name=ted", "report=false", "progress=false"])
    assert rc == 0
    (job,) = (tmp_path / "ted" / "jobs").iterdir()
    edits = pd.read_parquet(job / "edits.parquet")
    scores = pd.read_parquet(job / "scores.parquet")
    assert list(edits.sample_id) == ["tedbench_000", "tedbench_001", "tedbench_002"] and (edits.status == "ok").all()
    ds = open_dataset(card(bench))
    m = METHODS.get("tedbench_results").from_config({"path": str(bench)})
    for ref in ds.refs():
        s = ds.load(ref)
        out = m.edit(s, 0).image
        l1 = np.abs(out.astype(np.float64) - s.source.astype(np.float64)).mean() / 255.0
        row = scores[(scores.sample_id == ref.id) & (scores.metric == "l1") & (scores.region == "all")]
        assert len(row) == 1 and row.value.iloc[0] == pytest.approx(l1, rel=1e-9)  # same formula, other summation order
        masked = scores[(scores.sample_id == ref.id) & scores.region.isin(["edited", "unedited"])]
        assert len(masked) == 4 and masked.value.isna().all() and (masked.flag == "no_mask").all()
