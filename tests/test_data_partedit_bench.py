"""The PartEdit-Bench loader (format partedit_bench) and the authors' edits scored as a method
(method=partedit_bench_results), on tiny parquet files written here in the published schema."""
from __future__ import annotations

import hashlib

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import methods.partedit_bench_results  # noqa: F401  (registers the method until methods/__init__ imports it)
from harness.data import open_dataset
from harness.data.partedit_bench import CATEGORY, PartEditBenchDataset, sample_id
from harness.registry import METHODS
from harness.types import CATEGORIES, DatasetError, SampleError, SkipSample

from .conftest import REPO, disc_mask, textured

H = W = 64
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def row(i: int, split: str = "synth", **over) -> dict:
    """One row in PartEdit-Bench's schema (v1.1): image columns as {"bytes", "path"} structs."""
    src = textured(H, W, seed=i)
    mask = disc_mask(H, W, 20 + i, 30, 10)
    edit = 255 - src
    r = {
        "id": i,
        "original_image": {"bytes": png(src), "path": f"{i}.png"},
        "partedit": {"bytes": png(edit), "path": f"{i}_edit.png"},
        "subject": "man",
        "edit": "man with a golden helmet",
        "part": "humanoid-head",
        "gt_mask": {"bytes": png((mask * 255).astype(np.uint8)), "path": f"{i}_mask.png"},
        "class_name": "biped",
        "prompt_original": f"a photo of a man {i}",
        "prompt_changed": f"a photo of a man with a golden helmet {i}",
        "p2p_prompt": "a photo of a man with a golden helmet",
        "p2p_template": "a photo of a {} ",
        "instructp2p_edit1": "make his head a golden helmet",
        "instructp2p_edit2": "turn the head into a golden helmet",
        "instructp2p_edit3": "give him a golden helmet head",
        "seed": 1000 + i,
        "token_cls": "partimage_human_head",
    }
    r.update(over)
    return r


def write_parquet(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    """The rows as HF's parquet writer lays them out: image columns as struct<bytes, path>."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in rows[0] if c not in drop]
    arrays, fields = [], []
    for c in cols:
        values = [r.get(c) for r in rows]
        if c in ("original_image", "gt_mask", "partedit"):
            typ = IMAGE_STRUCT
        elif c in ("id", "seed"):
            typ = pa.int64() if all(v is None or isinstance(v, int) for v in values) else pa.string()
        else:
            typ = pa.string() if all(v is None or isinstance(v, str) for v in values) else None
        arrays.append(pa.array(values, type=typ))
        fields.append(c)
    pq.write_table(pa.Table.from_arrays(arrays, names=fields), path)
    return path


@pytest.fixture()
def bench(tmp_path) -> Path:
    """A downloaded-folder layout: data/synth-*.parquet (3 rows), data/real-*.parquet (2 rows)."""
    root = tmp_path / "PartEdit-Bench"
    write_parquet(root / "data" / "synth-00000-of-00001.parquet", [row(i) for i in range(3)])
    write_parquet(root / "data" / "real-00000-of-00001.parquet", [row(i, "real") for i in range(2)])
    return root


def card(root: Path, **over) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "dataset" / "partedit_bench.yaml").read_text())
    cfg.update(root=str(root), **over)
    return cfg


# -- reading the published layout ----------------------------------------------------------------
def test_reads_both_splits_with_every_field(bench):
    synth = open_dataset(card(bench))
    real = open_dataset(card(bench, split="real"))
    assert synth.name == "partedit_bench_synth" and real.name == "partedit_bench_real"
    assert [r.id for r in synth.refs()] == ["synth_0", "synth_1", "synth_2"]
    assert [r.id for r in real.refs()] == ["real_0", "real_1"]
    assert all(r.category == "part" and r.error is None for r in synth.refs())
    s = synth.load(synth.refs()[1])
    assert s.id == "synth_1" and s.dataset == "partedit_bench_synth"
    np.testing.assert_array_equal(s.source, textured(H, W, seed=1))  # the PNG bytes decoded exactly
    np.testing.assert_array_equal(s.mask, disc_mask(H, W, 21, 30, 10))
    assert s.mask.dtype == bool and int(s.mask.sum()) == int(disc_mask(H, W, 21, 30, 10).sum())
    assert s.source_caption == "a photo of a man 1"
    assert s.target_caption == "a photo of a man with a golden helmet 1"
    assert s.instruction == "make his head a golden helmet"
    assert s.part == "humanoid-head" and s.category == CATEGORY == "part" and "part" not in CATEGORIES
    assert s.target is None
    assert s.meta == {
        "split": "synth", "bench_id": 1, "seed": 1001, "subject": "man", "edit": "man with a golden helmet",
        "class_name": "biped", "token_cls": "partimage_human_head",
        "p2p_prompt": "a photo of a man with a golden helmet", "p2p_template": "a photo of a {} ",
        "instructp2p_edit2": "turn the head into a golden helmet", "instructp2p_edit3": "give him a golden helmet head",
    }
    assert synth.validate() == [] and real.validate() == []


def test_reads_one_parquet_file_and_other_layouts(tmp_path):
    f = write_parquet(tmp_path / "x" / "bench_real.parquet", [row(7)])
    ds = open_dataset(card(f, split="real"))
    assert [r.id for r in ds.refs()] == ["real_7"]
    assert ds.load(ds.refs()[0]).part == "humanoid-head"
    # data/<split>/*.parquet (two shards read in name order) and a data_files glob
    root = tmp_path / "other"
    write_parquet(root / "data" / "synth" / "b.parquet", [row(5)])
    write_parquet(root / "data" / "synth" / "a.parquet", [row(4)])
    assert [r.id for r in open_dataset(card(root)).refs()] == ["synth_4", "synth_5"]
    write_parquet(root / "mine" / "s.parquet", [row(9)])
    assert [r.id for r in open_dataset(card(root, data_files="mine/*.parquet")).refs()] == ["synth_9"]


def test_v1_0_without_token_cls_loads_with_it_null(tmp_path):
    root = tmp_path / "b"
    write_parquet(root / "data" / "synth-0.parquet", [row(0)], drop=("token_cls",))
    ds = open_dataset(card(root))
    s = ds.load(ds.refs()[0])
    assert s.meta["token_cls"] is None and s.meta["subject"] == "man"


def test_soft_mask_is_thresholded_and_noted_or_refused_by_binary(tmp_path):
    m = np.zeros((H, W), np.uint8)
    m[10:30, 10:30] = 255
    m[10:30, 30] = 128  # an anti-aliased edge: > 127, edited
    m[10:30, 31] = 90  # below the threshold: not edited
    root = tmp_path / "b"
    write_parquet(root / "data" / "synth-0.parquet", [row(0, gt_mask={"bytes": png(m), "path": None})])
    ds = open_dataset(card(root))
    s = ds.load(ds.refs()[0])
    assert int(s.mask.sum()) == 20 * 21 and s.mask[15, 30] and not s.mask[15, 31]
    assert s.meta["mask_conversions"]["mask"] == [
        "gt_mask: not binary (40 of 4096 pixels soft), thresholded at > 127 (0-255 scale) (mask_rule=threshold)"]
    warn = ds.validate()
    assert [(p.sample_id, p.field, p.level) for p in warn] == [("synth_0", "mask", "warning")]
    strict = open_dataset(card(root, mask_rule="binary"))
    with pytest.raises(SampleError, match=r"sample 'synth_0', field 'gt_mask': mask gt_mask is not binary: 40 of 4096"):
        strict.load(strict.refs()[0])


# -- bad input: errors naming the sample and the column -----------------------------------------
def test_bad_rows_fail_alone_naming_sample_and_column(tmp_path):
    big = textured(80, 80)
    rows = [
        row(0),
        row(1, prompt_changed=None),
        row(2, gt_mask={"bytes": png((disc_mask(32, 32, 10, 10, 5) * 255).astype(np.uint8)), "path": None}),
        row(3, original_image={"bytes": b"not an image", "path": "3.png"}),
        row(4, original_image={"bytes": png(big), "path": None}, gt_mask={"bytes": png(np.zeros((80, 80), np.uint8)), "path": None}),
        row(5, gt_mask={"bytes": png(np.zeros((H, W), np.uint8)), "path": None}),
        row(6, original_image={"bytes": None, "path": "../../etc/passwd"}),
        row(7, original_image={"bytes": None, "path": None}),
        row(8, part=""),
    ]
    root = tmp_path / "b"
    write_parquet(root / "data" / "synth-0.parquet", rows)
    ds = open_dataset(card(root, max_pixels=80 * 80 - 1))
    problems = {p.sample_id: (p.field, p.message) for p in ds.validate()}
    assert sorted(problems) == [f"synth_{i}" for i in range(1, 9)]
    assert problems["synth_1"] == ("prompt_changed", "missing (null)")
    assert problems["synth_2"] == ("gt_mask", "mask is 32x32 (WxH) but original_image is 64x64")
    assert problems["synth_3"][0] == "original_image" and "not a readable image" in problems["synth_3"][1]
    assert problems["synth_4"] == ("original_image", "original_image is 80x80 = 6400 pixels, over the limit of 6399 "
                                                     "(dataset.max_pixels); refused before decoding")
    assert problems["synth_5"] == ("gt_mask", "the part mask is empty (no pixel marks the part)")
    assert problems["synth_6"][0] == "original_image" and "'..' component" in problems["synth_6"][1]
    assert problems["synth_7"] == ("original_image", "image struct has neither bytes nor a path")
    assert problems["synth_8"] == ("part", "empty text")
    ok = ds.load(ds.refs()[0])
    assert ok.id == "synth_0" and ok.mask.sum() > 0


def test_a_path_only_image_is_read_inside_the_folder_and_never_outside(tmp_path):
    root = tmp_path / "b"
    (root / "images").mkdir(parents=True)
    Image.fromarray(textured(H, W, 3)).save(root / "images" / "0.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(textured(H, W, 4)).save(outside)
    (root / "images" / "link.png").symlink_to(outside)
    write_parquet(root / "data" / "synth-0.parquet", [
        row(0, original_image={"bytes": None, "path": "images/0.png"}),
        row(1, original_image={"bytes": None, "path": "images/link.png"}),
        row(2, original_image={"bytes": None, "path": str(outside)}),
    ])
    ds = open_dataset(card(root))
    refs = ds.refs()
    np.testing.assert_array_equal(ds.load(refs[0]).source, textured(H, W, 3))
    with pytest.raises(SampleError, match=r"sample 'synth_1', field 'original_image': path 'images/link.png' "
                                          r"resolves outside the dataset folder"):
        ds.load(refs[1])
    with pytest.raises(SampleError, match=r"sample 'synth_2', field 'original_image': path .* is absolute"):
        ds.load(refs[2])


def test_whole_file_problems_are_one_clear_error(tmp_path):
    root = tmp_path / "b"
    write_parquet(root / "data" / "synth-0.parquet", [row(0)], drop=("gt_mask",))
    with pytest.raises(DatasetError, match=r"data/synth-0.parquet: no column\(s\) gt_mask"):
        open_dataset(card(root)).refs()
    (root / "data" / "real-0.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DatasetError, match=r"data/real-0.parquet: not readable as parquet"):
        open_dataset(card(root, split="real")).refs()
    with pytest.raises(ValueError, match=r"split must be one of synth, real, got 'test'"):
        open_dataset(card(root, split="test"))


def test_missing_copy_names_the_root_and_how_to_obtain(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(card(tmp_path / "nowhere"))
    msg = str(e.value)
    assert f"PartEdit-Bench not found: {tmp_path / 'nowhere'}" in msg
    assert "how to obtain dataset 'partedit_bench_synth'" in msg and "Aleksandar/PartEdit-Bench" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no parquet file of split 'real' in .*empty \(looked for "
                                                 r"data/real-\*.parquet"):
        open_dataset(card(tmp_path / "empty", split="real"))


def test_a_parquet_link_leading_out_of_the_folder_is_refused(tmp_path):
    outside = write_parquet(tmp_path / "elsewhere" / "x.parquet", [row(0)])
    root = tmp_path / "b"
    (root / "data").mkdir(parents=True)
    os.symlink(outside, root / "data" / "synth-0.parquet")
    with pytest.raises(DatasetError, match=r"data/synth-0.parquet resolves outside the dataset folder"):
        open_dataset(card(root))


def test_duplicate_ids_and_subsets(tmp_path):
    root = tmp_path / "b"
    write_parquet(root / "data" / "synth-0.parquet", [row(0), row(1), row(1), row(2), row(3)])
    ds = open_dataset(card(root))
    refs = ds.refs()
    assert [r.id for r in refs] == ["synth_0", "synth_1", "synth_1.row2", "synth_2", "synth_3"]
    assert refs[2].error.field == "id" and "repeats an earlier row" in refs[2].error.message
    assert [r.id for r in open_dataset(card(root, ids=["synth_3", "synth_0"])).refs()] == ["synth_0", "synth_3"]
    assert [r.id for r in open_dataset(card(root, limit=2)).refs()] == ["synth_0", "synth_1"]
    every = [r.id for r in refs]  # shard i of n: the ids whose sha1 is i mod n
    assert [r.id for r in open_dataset(card(root, shard="1/2")).refs()] == [x for x in every if int(hashlib.sha1(x.encode()).hexdigest(), 16) % 2 == 1]


def test_fingerprint_follows_the_image_bytes(tmp_path):
    root = tmp_path / "b"
    f = write_parquet(root / "data" / "synth-0.parquet", [row(0), row(1)])
    before = [open_dataset(card(root)).fingerprint(r) for r in open_dataset(card(root)).refs()]
    changed = row(1)
    changed["gt_mask"] = {"bytes": png((disc_mask(H, W, 40, 40, 9) * 255).astype(np.uint8)), "path": "1_mask.png"}
    write_parquet(f, [row(0), changed])
    ds = open_dataset(card(root))
    after = [ds.fingerprint(r) for r in ds.refs()]
    assert after[0] == before[0] and after[1] != before[1]


def test_sample_ids():
    assert sample_id("synth", 12) == "synth_12"
    assert sample_id("real", "a b/c") == "real_a_b_c"


# -- the authors' results as a method ----------------------------------------------------------
def test_partedit_bench_results_returns_the_authors_edit_of_each_sample(bench):
    m = METHODS.get("partedit_bench_results").from_config({"path": str(bench)})
    for split, n in (("synth", 3), ("real", 2)):
        ds = open_dataset(card(bench, split=split))
        for ref in ds.refs():
            s = ds.load(ref)
            out = m.edit(s, seed=0)
            np.testing.assert_array_equal(out.image, 255 - s.source)  # row(): the "edit" is the negative
            assert out.info == {"column": "partedit"}
        assert len(ds.refs()) == n
    rev = m.model_revision()
    assert len(rev) == 16 and rev == METHODS.get("partedit_bench_results").from_config({"path": str(bench)}).model_revision()


def test_partedit_bench_results_skips_rows_it_lacks_and_fails_on_a_wrong_size(bench, tmp_path):
    m = METHODS.get("partedit_bench_results").from_config({"path": str(bench)})
    ds = open_dataset(card(bench))
    s = ds.load(ds.refs()[0])
    import dataclasses

    with pytest.raises(SkipSample, match=r"PartEdit-Bench copy 'PartEdit-Bench' has no row for sample 'synth_9'"):
        m.edit(dataclasses.replace(s, id="synth_9"), 0)
    with pytest.raises(SampleError, match=r"sample 'synth_0', field 'partedit': the authors' edit is 64x64 \(WxH\) "
                                          r"but the source is 32x32"):
        m.edit(dataclasses.replace(s, source=textured(32, 32)), 0)
    root = tmp_path / "nores"
    write_parquet(root / "data" / "synth-0.parquet", [row(0, partedit=None)])
    with pytest.raises(SkipSample, match=r"row of sample 'synth_0' has no 'partedit' image"):
        METHODS.get("partedit_bench_results").from_config({"path": str(root)}).edit(s, 0)
    with pytest.raises(ValueError, match=r"'path' \(the PartEdit-Bench copy"):
        METHODS.get("partedit_bench_results").from_config({})
    with pytest.raises(FileNotFoundError, match=r"PartEdit-Bench copy not found or empty"):
        METHODS.get("partedit_bench_results").from_config({"path": str(tmp_path / "none")}).edit(s, 0)


def test_partedit_bench_results_yaml_and_the_command_of_its_comment(bench):
    """Composed as `edit-harness run dataset=partedit_bench method=partedit_bench_results
    method.path=DIR` composes it; the YAML holds the Params defaults (path required)."""
    from harness.cli import check_jobs

    jobs = check_jobs(["dataset=partedit_bench", f"dataset.root={bench}", "method=partedit_bench_results",
                       f"method.path={bench}", "metrics=partedit"], multirun=False)
    (cfg,) = jobs.configs
    assert cfg["method"] == {"name": "partedit_bench_results", "path": str(bench), "label": "PartEdit (published)"}
    assert cfg["dataset"]["name"] == "partedit_bench_synth" and cfg["dataset"]["format"] == "partedit_bench"
    assert cfg["metrics"]["protocol"] == "partedit"
    conf = yaml.safe_load((REPO / "conf" / "method" / "partedit_bench_results.yaml").read_text())
    assert conf == {"name": "partedit_bench_results", "path": "", "label": "PartEdit (published)"}


# -- the embedded sample set's part edits ------------------------------------------------------
PART_SAMPLES = {  # id -> (part, official part token, source image)
    "astronaut_hair_pink": ("hair", "human_hair", "images/astronaut.png"),
    "grace_hopper_head_statue": ("head", "human_head", "images/grace_hopper.png"),
    "astronaut_torso_armor": ("torso", "human_torso_custom", "images/astronaut.png"),
}


def test_the_sample_set_has_part_edits_for_a_partedit_smoke_run():
    """Three part edits (hair, head, torso) on real photos, each with a hand-made part mask, the
    fields PartEdit reads, and its prompts built as the official model.py builds them
    (target = source.replace(subject, edit))."""
    from harness.data import GenericDataset

    ds = GenericDataset(REPO / "datasets" / "sample")
    refs = ds.refs()
    parts = [r for r in refs if r.category == "part"]
    assert [r.id for r in parts] == list(PART_SAMPLES) and len(refs) == 22
    card_yaml = yaml.safe_load((REPO / "datasets" / "sample" / "card.yaml").read_text())
    # part (PartEdit), drag and appearance (DiffEditor) are the categories the set adds to the harness's
    assert card_yaml["extra_categories"] == ["appearance", "drag", "part"] and card_yaml["categories"]["part"] == 3
    assert sum(card_yaml["categories"].values()) == 22 and "22 text-guided editing samples" in card_yaml["description"]
    areas = {}
    for r in parts:
        s = ds.load(r)
        part, token, src = PART_SAMPLES[s.id]
        assert (s.part, s.meta["token_cls"], r.record["source"]) == (part, token, src)
        assert s.target_caption == s.source_caption.replace(s.meta["subject"], s.meta["edit"]), s.id
        assert s.meta["subject"] in s.source_caption and s.instruction
        # the official Prompt-to-Prompt word swap (AttentionReplace) needs equal word counts
        assert len(s.source_caption.split(" ")) == len(s.target_caption.split(" ")), s.id
        assert s.mask.shape == (512, 512) and s.mask.dtype == bool
        areas[s.id] = int(s.mask.sum())
        # one connected part (the recipes keep the largest component)
        from scipy import ndimage

        assert ndimage.label(s.mask)[1] == 1, s.id
    # sizes a part has in these photos: hair < head < torso (each a few % to a quarter of the image)
    assert 0.02 * 512 * 512 < areas["astronaut_hair_pink"] < areas["grace_hopper_head_statue"] \
        < areas["astronaut_torso_armor"] < 0.3 * 512 * 512
    # the hair is above the face, the torso below the neck ring (y of each mask's centre)
    hair = ds.load(next(r for r in parts if r.id == "astronaut_hair_pink")).mask
    torso = ds.load(next(r for r in parts if r.id == "astronaut_torso_armor")).mask
    assert np.nonzero(hair)[0].mean() < 100 < 300 < np.nonzero(torso)[0].mean()
    assert not (hair & torso).any()


def test_the_build_scripts_category_list_is_the_harness_s():
    """build_sample_set.py restates harness.types.CATEGORIES (it runs without the harness): the
    card's extra_categories are right only while the two lists agree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_sample_set", REPO / "datasets" / "sample" / "build_sample_set.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HARNESS_CATEGORIES == CATEGORIES
