"""The PIE-Bench loader: official RLE masks, prompt cleaning, categories, subsets, a whole run."""
from __future__ import annotations

import hashlib

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import harness.data.pie_bench as pie
from harness.cli import main
from harness.data import open_dataset
from harness.data.pie_bench import EDITING_TYPES, clean_prompt, decode_rle_mask
from harness.types import SampleError

from .conftest import REPO, textured

FOLDERS = {
    "0": "0_random_140",
    "1": "1_change_object_80/1_artificial/1_animal",
    "2": "2_add_object_80/2_natural/3_indoor",
    "3": "3_delete_object_80/1_artificial/4_outdoor",
    "4": "4_change_attribute_content_40/2_natural/2_human",
    "5": "5_change_attribute_pose_40/1_artificial/1_animal",
    "6": "6_change_attribute_color_40/2_natural/1_animal",
    "7": "7_change_attribute_material_40/1_artificial/3_indoor",
    "8": "8_change_background_80/2_natural/4_outdoor",
    "9": "9_change_style_80/1_artificial/2_human",
}


def official_mask_decode(encoded, shape=(512, 512)):
    """evaluation/evaluate.py's mask_decode, restated loop for loop (0-based starts, runs clipped
    at the end, then the border set to 1), to compare the vectorised decoder with."""
    n = shape[0] * shape[1]
    flat = np.zeros(n)
    for i in range(0, len(encoded), 2):
        for j in range(min(encoded[i + 1], n - encoded[i])):
            flat[encoded[i] + j] = 1
    m = flat.reshape(shape)
    m[0, :] = m[-1, :] = 1
    m[:, 0] = m[:, -1] = 1
    return m


class PieBuilder:
    """Writes a tiny PIE-Bench in the official layout: mapping_file.json + annotation_images/."""

    def __init__(self, root: Path):
        self.root = root
        (root / "annotation_images").mkdir(parents=True, exist_ok=True)
        self.mapping: dict[str, dict] = {}

    def add(self, key: str, type_id: str = "1", size=(512, 512), rle=None, **fields) -> dict:
        rel = f"{FOLDERS[type_id]}/{key}.jpg" if type_id in FOLDERS else f"x/{key}.jpg"
        p = self.root / "annotation_images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured(size[1], size[0], seed=len(self.mapping))).save(p, quality=95)
        entry = {
            "image_path": rel,
            "original_prompt": "a [red] car parked on a street",
            "editing_prompt": "a [blue] car parked on a street",
            "editing_instruction": "make the car blue",
            "editing_type_id": type_id,
            "blended_word": "car car",
            "mask": rle if rle is not None else [512 * 200 + 100, 150, 512 * 201 + 100, 150],
        }
        entry.update(fields)
        self.mapping[key] = entry
        self.write()
        return entry

    def write(self) -> None:
        (self.root / "mapping_file.json").write_text(json.dumps(self.mapping))

    def config(self, **kw) -> dict:
        return {"name": "pie_bench", "format": "pie_bench", "root": str(self.root), **kw}


@pytest.fixture
def pb(tmp_path) -> PieBuilder:
    return PieBuilder(tmp_path / "pie" / "data")


# -- the RLE ----------------------------------------------------------------------------------
def test_rle_hand_computed_runs_and_clipped_last_run():
    # 6x8 image = 48 pixels, row-major: pixel (y, x) is flat index 8*y + x.
    rle = [0, 3, 10, 2, 21, 0, 45, 10]  # a zero-length run; the last run (45..54) is clipped at 47
    expected = np.zeros((6, 8), bool)
    expected[0, 0:3] = True        # 0, 1, 2
    expected[1, 2:4] = True        # 10, 11
    expected[5, 5:8] = True        # 45, 46, 47
    assert np.array_equal(decode_rle_mask(rle, (6, 8), border=False), expected)
    # the official border rule: first and last row and column forced to 1 (= edited)
    bordered = expected.copy()
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = True
    got = decode_rle_mask(rle, (6, 8))
    assert got.dtype == bool and np.array_equal(got, bordered)
    assert np.array_equal(got, official_mask_decode(rle, (6, 8)).astype(bool))


def test_rle_512_matches_the_official_loop():
    rng = np.random.default_rng(0)
    n = 512 * 512
    starts = np.sort(rng.choice(n, 40, replace=False))
    rle = []
    for s in starts:
        rle += [int(s), int(rng.integers(0, 3000))]
    rle += [n - 5, 100]  # clipped at the last pixel
    rle += [1000, 50, 1020, 10]  # overlapping runs
    got = decode_rle_mask(rle)
    assert got.shape == (512, 512)
    assert np.array_equal(got, official_mask_decode(rle).astype(bool))
    assert got[-1, -5:].all()
    # an empty encoding leaves only the forced border
    empty = decode_rle_mask([])
    assert empty.sum() == 4 * 512 - 4 and not empty[1:-1, 1:-1].any()


@pytest.mark.parametrize(
    "rle, words",
    [
        ([0, 3, 10], "odd length"),
        ([-1, 3], "negative"),
        ([512 * 512, 1], "outside the 512x512"),
        ([5, -2], "negative length"),
        ([1.5, 2], "integers"),
        ([True, 2], "integers"),
        ("0 3", "list"),
    ],
)
def test_bad_rle_is_rejected(rle, words):
    with pytest.raises(ValueError, match=words):
        decode_rle_mask(rle)


def test_bad_rle_entry_names_sample_and_mask(pb):
    pb.add("000000000001", rle=[0, 3, 10])
    pb.add("000000000002", rle=[-4, 3])
    pb.add("000000000003", rle=[600000, 3])
    pb.add("000000000004")
    ds = open_dataset(pb.config())
    refs = {r.id: r for r in ds.refs()}
    for sid in ("000000000001", "000000000002", "000000000003"):
        err = refs[sid].error
        assert isinstance(err, SampleError) and err.sample_id == sid and err.field == "mask"
        with pytest.raises(SampleError, match=f"sample '{sid}', field 'mask'"):
            ds.load(refs[sid])
    assert refs["000000000004"].error is None
    assert sorted(e.sample_id for e in ds.validate()) == ["000000000001", "000000000002", "000000000003"]


# -- samples ----------------------------------------------------------------------------------
def test_sample_fields_prompts_and_mask(pb):
    rle = [512 * 10 + 20, 30, 512 * 511 + 500, 40]  # the second run is clipped at the end
    pb.add(
        "111000000000",
        type_id="1",
        rle=rle,
        original_prompt="a [red]  car, [old] style",
        editing_prompt="a [blue]  car, [new] style",
    )
    ds = open_dataset(pb.config())
    (ref,) = ds.refs()
    s = ds.load(ref)
    assert s.id == "111000000000" and s.dataset == "pie_bench"
    assert s.source.shape == (512, 512, 3) and s.source.dtype == np.uint8 and s.target is None
    # the official cleaning removes the brackets only (the double space stays)
    assert s.source_caption == "a red  car, old style" and s.target_caption == "a blue  car, new style"
    assert s.instruction == "make the car blue"
    assert s.meta["original_prompt"] == "a [red]  car, [old] style" and s.meta["blended_word"] == "car car"
    assert np.array_equal(s.mask, official_mask_decode(rle).astype(bool))
    assert s.mask[10, 20:50].all() and not s.mask[10, 50] and s.mask[0].all() and s.mask[:, -1].all()
    assert s.category == "change_object" and s.meta["editing_type_id"] == "1"


def test_clean_prompt_is_the_official_rule():
    for text in ("a [cat] sitting", "[a] [b]c[", "no brackets", " [ x ] "):
        assert clean_prompt(text) == text.replace("[", "").replace("]", "")


def test_category_mapping(pb):
    expected = {
        "0": "random", "1": "change_object", "2": "add", "3": "remove", "4": "change_content",
        "5": "change_pose", "6": "change_color", "7": "change_material", "8": "change_background",
        "9": "change_style",
    }
    assert {k: v[0] for k, v in EDITING_TYPES.items()} == expected
    assert EDITING_TYPES["3"][1] == "delete object" and EDITING_TYPES["7"][1] == "change attribute material"
    for type_id in expected:
        pb.add(f"{type_id}00000000000", type_id=type_id)
    pb.add("900000000001", type_id=7)  # an integer id is read as its string
    pb.add("900000000002", type_id="10")
    ds = open_dataset(pb.config())
    refs = {r.id: r for r in ds.refs()}
    for type_id, cat in expected.items():
        assert refs[f"{type_id}00000000000"].category == cat
    assert refs["900000000001"].category == "change_material"
    assert refs["900000000002"].error.field == "editing_type_id"
    s = ds.load(refs["500000000000"])
    assert s.category == "change_pose" and s.meta["editing_type"] == "change attribute pose"


def test_missing_fields_and_wrong_size(pb):
    pb.add("000000000001", editing_prompt=None)
    pb.add("000000000002", size=(500, 512))
    entry = pb.add("000000000003")
    del entry["mask"]
    pb.write()
    ds = open_dataset(pb.config())
    refs = {r.id: r for r in ds.refs()}
    assert refs["000000000001"].error.field == "editing_prompt"
    assert refs["000000000003"].error.field == "mask"
    with pytest.raises(SampleError, match="sample '000000000002', field 'source'.*512x512"):
        ds.load(refs["000000000002"])


def test_refs_decode_nothing(pb, monkeypatch):
    for i in range(3):
        pb.add(f"00000000000{i}")

    def boom(*a, **k):
        raise AssertionError("refs() must not decode images")

    monkeypatch.setattr(pie, "load_image", boom)
    monkeypatch.setattr(Image, "open", boom)
    ds = open_dataset(pb.config())
    assert [r.id for r in ds.refs()] == ["000000000000", "000000000001", "000000000002"]
    assert all(r.error is None and r.fingerprint for r in ds.refs())


def test_limit_shard_ids_editing_types(pb):
    for i in range(6):
        pb.add(f"s{i}", type_id=str(i % 3))
    ds = lambda **kw: open_dataset(pb.config(**kw))  # noqa: E731
    assert [r.id for r in ds(limit=2).refs()] == ["s0", "s1"]
    # shard i of n: the ids whose sha1 (a big-endian integer) is i mod n (after the limit)
    assert [r.id for r in ds(shard="1/3").refs()] == [x for x in [f"s{i}" for i in range(6)] if int(hashlib.sha1(x.encode()).hexdigest(), 16) % 3 == 1]
    assert [r.id for r in ds(ids=["s5", "s2"]).refs()] == ["s2", "s5"]
    assert [r.id for r in ds(editing_types=["2", 0]).refs()] == ["s0", "s2", "s3", "s5"]
    assert [r.id for r in ds(editing_types=["1"], limit=1).refs()] == ["s1"]
    with pytest.raises(ValueError, match="shard"):
        ds(shard="3/3")
    with pytest.raises(KeyError, match="nope"):
        ds(ids=["nope"]).refs()
    with pytest.raises(ValueError, match="editing type"):
        ds(editing_types=["12"])


def test_missing_root_says_how_to_obtain(tmp_path):
    card = yaml.safe_load((REPO / "conf" / "dataset" / "pie_bench.yaml").read_text())
    card["root"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(card)
    msg = str(e.value)
    assert "pie_bench" in msg and str(tmp_path / "nowhere") in msg
    assert "forms.gle/hVMkTABb4uvZVjme9" in msg and "mapping_file.json" in msg
    (tmp_path / "empty").mkdir()
    card["root"] = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="mapping file not found"):
        open_dataset(card)


def test_whole_run_through_the_cli(pb, tmp_path):
    for type_id in ("0", "3", "6"):
        pb.add(f"{type_id}00000000000", type_id=type_id)
    pb.add("bad", rle=[1, 2, 3])
    rc = main([
        "run", "dataset=pie_bench", f"dataset.root={pb.root}", "method=identity", "metrics=pixel",
        "progress=false", f"results_dir={tmp_path / 'results'}", "run_name=pie",
    ])
    assert rc == 0
    (job,) = (tmp_path / "results" / "pie" / "jobs").iterdir()
    edits = pd.read_parquet(job / "edits.parquet").set_index("sample_id")
    assert edits.loc[["000000000000", "300000000000", "600000000000"], "status"].eq("ok").all()
    assert edits.loc["bad", "status"] == "failed" and "field 'mask'" in edits.loc["bad", "reason"]
    assert set(edits.drop(index="bad").category) == {"random", "remove", "change_color"}
    scores = pd.read_parquet(job / "scores.parquet")
    # identity against the source: exactly 0 on the 3 good samples x 2 metrics x 3 regions; the
    # border rule makes every edited region non-empty, and the runs leave unedited pixels: no NaN
    assert set(scores.sample_id) == {"000000000000", "300000000000", "600000000000"}
    assert set(scores.region) == {"all", "edited", "unedited"} and set(scores.metric) == {"l1", "l2"}
    assert len(scores) == 3 * 2 * 3 and scores.value.notna().all() and (scores.value == 0).all()
    assert (tmp_path / "results" / "pie" / "report" / "table.md").is_file()
