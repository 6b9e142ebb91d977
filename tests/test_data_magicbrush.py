"""The MagicBrush test-set loader: layout, single-turn vs multi-turn samples, masks, a whole run."""
from __future__ import annotations

import hashlib

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import harness.data.magicbrush as mb
from harness.cli import main
from harness.data import open_dataset
from harness.data.magicbrush import read_magicbrush_mask
from harness.types import SampleError

from .conftest import REPO, disc_mask, textured

H, W = 40, 56


class MagicBrushBuilder:
    """Writes a tiny MagicBrush test set in the official layout (the unzipped ``test/`` folder)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.sessions: dict[str, list[dict]] = {}
        self.local: dict[str, dict[str, str]] = {}
        self.glob: dict[str, dict[str, str]] = {}
        self.arrays: dict[str, np.ndarray] = {}  # file name -> pixels written

    def _save(self, img_id: str, fname: str, arr: np.ndarray) -> None:
        Image.fromarray(arr).save(self.root / "images" / img_id / fname)
        self.arrays[fname] = arr

    def session(self, img_id: str, turns: int, mask_style: str = "transparent") -> None:
        (self.root / "images" / img_id).mkdir(parents=True, exist_ok=True)
        seed = 10 * len(self.sessions)
        self._save(img_id, f"{img_id}-input.png", textured(H, W, seed))
        self.glob[img_id] = {f"{img_id}-input.png": f"global caption of {img_id} input"}
        self.local[img_id] = {}
        entries = []
        prev = f"{img_id}-input.png"
        for t in range(1, turns + 1):
            out, mask = f"{img_id}-output{t}.png", f"{img_id}-mask{t}.png"
            self._save(img_id, out, textured(H, W, seed + t))
            region = disc_mask(H, W, H / 2, W / 2, 6 + 2 * t)
            if mask_style == "transparent":  # DALL-E 2 editor: the input with the edited region erased
                rgba = np.dstack([self.arrays[prev], np.where(region, 0, 255).astype(np.uint8)])
                self._save(img_id, mask, rgba)
            else:  # white region on black
                self._save(img_id, mask, np.where(region, 255, 0).astype(np.uint8))
            entries.append({"input": prev, "mask": mask, "output": out, "instruction": f"edit {t} of {img_id}"})
            self.local[img_id][out] = f"local caption {t} of {img_id}"
            self.glob[img_id][out] = f"global caption {t} of {img_id}"
            prev = out
        self.sessions[img_id] = entries
        self.write()

    def write(self) -> None:
        for name, obj in (("edit_sessions.json", self.sessions), ("local_descriptions.json", self.local),
                          ("global_descriptions.json", self.glob)):
            (self.root / name).write_text(json.dumps(obj))

    def config(self, **kw) -> dict:
        return {"name": "magicbrush", "format": "magicbrush", "root": str(self.root), **kw}


@pytest.fixture
def mbb(tmp_path) -> MagicBrushBuilder:
    b = MagicBrushBuilder(tmp_path / "MagicBrush" / "test")
    b.session("101", 3)
    b.session("202", 1)
    b.session("303", 2)
    return b


ALL_IDS = ["101_1", "101_2", "101_3", "202_1", "303_1", "303_2"]


def _samples(mbb, **kw):
    ds = open_dataset(mbb.config(**kw))
    return ds, {r.id: ds.load(r) for r in ds.refs()}


def test_single_turn_samples(mbb):
    ds, s = _samples(mbb, setting="single_turn")
    assert list(s) == ALL_IDS
    for sid, sample in s.items():
        img_id, t = sid.split("_")
        t = int(t)
        assert sample.session == img_id and sample.turn == t and sample.dataset == "magicbrush"
        prev = f"{img_id}-input.png" if t == 1 else f"{img_id}-output{t - 1}.png"
        # single-turn: the source is the ground-truth previous output (the input image for turn 1)
        assert np.array_equal(sample.source, mbb.arrays[prev])
        assert np.array_equal(sample.target, mbb.arrays[f"{img_id}-output{t}.png"])
        assert sample.instruction == f"edit {t} of {img_id}"
        # CLIP-T's caption: the turn's local description
        assert sample.target_caption == f"local caption {t} of {img_id}"
        src_caption = f"global caption of {img_id} input" if t == 1 else f"global caption {t - 1} of {img_id}"
        assert sample.source_caption == src_caption
        assert sample.meta["target_global_caption"] == f"global caption {t} of {img_id}"
        assert sample.meta["self_fed"] is False and "previous_sample" not in sample.meta
        assert sample.category is None
    assert [sid for sid, x in s.items() if x.meta["final_turn"]] == ["101_3", "202_1", "303_2"]


def test_multi_turn_samples_are_chained_by_session_and_turn(mbb):
    ds, s = _samples(mbb, setting="multi_turn")
    assert list(s) == ALL_IDS
    assert [(x.session, x.turn) for x in s.values()] == [
        ("101", 1), ("101", 2), ("101", 3), ("202", 1), ("303", 1), ("303", 2)
    ]
    assert not s["101_1"].meta["self_fed"] and np.array_equal(s["101_1"].source, mbb.arrays["101-input.png"])
    for sid, prev in (("101_2", "101_1"), ("101_3", "101_2"), ("303_2", "303_1")):
        m = s[sid].meta
        assert m["self_fed"] and m["previous_sample"] == prev and m["source_from"] == "ground_truth_stand_in"
    assert [sid for sid, x in s.items() if x.meta["final_turn"]] == ["101_3", "202_1", "303_2"]
    # the two settings are different edits of the same turn: different cache fingerprints
    single = {r.id: r.fingerprint for r in open_dataset(mbb.config(setting="single_turn")).refs()}
    assert all(single[r.id] != r.fingerprint for r in ds.refs())


def test_feed_previous_replaces_the_source(mbb):
    ds, s = _samples(mbb, setting="multi_turn")
    prev_edit = np.full((H, W, 3), 7, np.uint8)
    fed = ds.feed_previous(s["101_2"], prev_edit)
    assert np.array_equal(fed.source, prev_edit) and fed.meta["source_from"] == "previous_edit"
    assert np.array_equal(fed.mask, s["101_2"].mask) and fed.target is s["101_2"].target
    bigger = ds.feed_previous(s["101_2"], np.zeros((2 * H, 2 * W, 3), np.uint8))
    assert bigger.mask.shape == (2 * H, 2 * W) and "resized" in bigger.meta["input_notes"][-1]
    with pytest.raises(ValueError, match="not a self-fed turn"):
        ds.feed_previous(s["101_1"], prev_edit)
    with pytest.raises(SampleError, match="field 'source'"):
        ds.feed_previous(s["101_3"], prev_edit.astype(np.float32))


def test_subsets_single_turn(mbb):
    ds = lambda **kw: open_dataset(mbb.config(setting="single_turn", **kw))  # noqa: E731
    assert [r.id for r in ds(limit=2).refs()] == ["101_1", "101_2"]
    # single turn too: a turn's shard is its session's (the session id's sha1 mod n), so an image's
    # turns share a shard
    every = [r.id for r in ds().refs()]
    for i in range(4):
        assert [r.id for r in ds(shard=f"{i}/4").refs()] == [
            t for t in every if int(hashlib.sha1(t.split("_")[0].encode()).hexdigest(), 16) % 4 == i]
    assert [r.id for r in ds(ids=["303_2", "101_2"]).refs()] == ["101_2", "303_2"]
    assert [r.id for r in ds(ids=["303"]).refs()] == ["303_1", "303_2"]
    with pytest.raises(KeyError, match="nope"):
        ds(ids=["nope"]).refs()
    with pytest.raises(ValueError, match="shard"):
        ds(shard="2/2")


def test_subsets_multi_turn_keep_sessions_whole(mbb):
    ds = lambda **kw: open_dataset(mbb.config(setting="multi_turn", **kw))  # noqa: E731
    assert [r.id for r in ds(limit=2).refs()] == ["101_1", "101_2", "101_3", "202_1"]
    # multi turn: a session's turns stay together, sharded by the session id's sha1 mod n
    every = [r.id for r in ds().refs()]
    for i in range(2):
        assert [r.id for r in ds(shard=f"{i}/2").refs()] == [
            t for t in every if int(hashlib.sha1(t.split("_")[0].encode()).hexdigest(), 16) % 2 == i]
    # a self-fed turn needs the turns before it
    assert [r.id for r in ds(ids=["101_2"]).refs()] == ["101_1", "101_2"]
    assert [r.id for r in ds(ids=["303", "202_1"]).refs()] == ["202_1", "303_1", "303_2"]


def test_mask_conventions(mbb, tmp_path):
    ds, s = _samples(mbb)
    region = disc_mask(H, W, H / 2, W / 2, 6 + 2 * 1)
    # DALL-E 2 style: alpha 0 = the region to edit
    assert np.array_equal(s["101_1"].mask, region) and s["101_1"].meta["mask_convention"] == "transparent"
    b = MagicBrushBuilder(tmp_path / "white")
    b.session("9", 1, mask_style="white")
    ds_w, sw = _samples(b)
    assert np.array_equal(sw["9_1"].mask, disc_mask(H, W, H / 2, W / 2, 8)) and sw["9_1"].meta["mask_convention"] == "white"
    _, sb = _samples(b, mask_convention="black")
    assert np.array_equal(sb["9_1"].mask, ~disc_mask(H, W, H / 2, W / 2, 8))
    ds_t = open_dataset(b.config(mask_convention="transparent"))
    with pytest.raises(SampleError, match="sample '9_1', field 'mask'.*no alpha"):
        ds_t.load(ds_t.refs()[0])
    with pytest.raises(ValueError, match="mask_convention"):
        open_dataset(b.config(mask_convention="red"))
    # a mask that does not fit its image
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(b.root / "images" / "9" / "9-mask1.png")
    with pytest.raises(SampleError, match="sample '9_1', field 'mask'.*56x41 .* 56x40"):
        ds_w.load(ds_w.refs()[0])
    p = b.root / "m.png"
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8)).save(p)  # fully opaque RGBA: no alpha region
    m, conv = read_magicbrush_mask(p, "x", (4, 4), "auto")
    assert conv == "white" and m.all()


def test_bad_entries_and_captions(mbb):
    mbb.sessions["101"][1].pop("output")
    mbb.sessions["bad id"] = [{"input": "a", "mask": "b", "output": "c", "instruction": "d"}]
    mbb.sessions["404"] = []
    del mbb.local["303"]["303-output2.png"]
    mbb.write()
    ds = open_dataset(mbb.config())
    refs = {r.id: r for r in ds.refs()}
    assert refs["101_2"].error.field == "output" and refs["101_2"].error.sample_id == "101_2"
    assert refs["bad id_1"].error.field == "session" and refs["404_1"].error.field == "session"
    with pytest.raises(SampleError, match="sample '101_2', field 'output'"):
        ds.load(refs["101_2"])
    s = ds.load(refs["303_2"])
    assert s.target_caption is None and "no caption for 303-output2.png" in s.meta["input_notes"][0]
    # captions can be switched off explicitly, but a named caption file must exist
    no_caps = open_dataset(mbb.config(local_captions=None, global_captions=None))
    s = no_caps.load(no_caps.refs()[0])
    assert s.target_caption is None and s.source_caption is None and "input_notes" not in s.meta
    (mbb.root / "local_descriptions.json").unlink()
    with pytest.raises(FileNotFoundError, match="local caption file not found"):
        open_dataset(mbb.config())
    (mbb.root / "images" / "202" / "202-output1.png").unlink()
    problems = no_caps.validate()
    assert {(p.sample_id, p.field) for p in problems} == {("101_2", "output"), ("bad id_1", "session"),
                                                          ("404_1", "session"), ("202_1", "target")}


def test_refs_decode_nothing(mbb, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("refs() must not decode images")

    monkeypatch.setattr(mb, "load_image", boom)
    monkeypatch.setattr(Image, "open", boom)
    for setting in ("single_turn", "multi_turn"):
        refs = open_dataset(mbb.config(setting=setting)).refs()
        assert [r.id for r in refs] == ALL_IDS and all(r.error is None for r in refs)


def test_missing_root_says_how_to_obtain(tmp_path):
    card = yaml.safe_load((REPO / "conf" / "dataset" / "magicbrush.yaml").read_text())
    card["root"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(card)  # a card read as plain YAML: its name interpolation is resolved
    msg = str(e.value)
    assert "magicbrush_single_turn" in msg and str(tmp_path / "nowhere") in msg
    assert "github.com/OSU-NLP-Group/MagicBrush" in msg and "edit_sessions.json" in msg
    with pytest.raises(ValueError, match="setting"):
        open_dataset({**card, "root": str(tmp_path), "setting": "both"})


def test_whole_run_through_the_cli(mbb, tmp_path):
    rc = main([
        "run", "dataset=magicbrush", f"dataset.root={mbb.root}", "method=identity", "metrics=pixel",
        "progress=false", f"results_dir={tmp_path / 'results'}", "report=false",
    ])
    assert rc == 0
    (job,) = (tmp_path / "results" / "magicbrush_single_turn-pixel" / "jobs").iterdir()
    edits = pd.read_parquet(job / "edits.parquet")
    assert sorted(edits.sample_id) == ALL_IDS and (edits.status == "ok").all()
    assert set(edits.dataset) == {"magicbrush_single_turn"}
    scores = pd.read_parquet(job / "scores.parquet")
    # pixel compares the edit with the source: identity scores exactly 0 (uint8 arithmetic on
    # equal images) on every sample, metric and region; every region is non-empty, so no NaN
    assert sorted(scores.sample_id.unique()) == ALL_IDS and set(scores.region) == {"all", "edited", "unedited"}
    assert len(scores) == len(ALL_IDS) * 2 * 3 and set(scores.metric) == {"l1", "l2"}
    assert scores.value.notna().all() and (scores.value == 0).all()


L1_TARGET = {"protocol": "magicbrush", "reference": "target", "regions": ["all"], "items": {"l1": {}}}
SESSIONS = {"101": 3, "202": 1, "303": 2}


def _shift(img: np.ndarray, k: int) -> np.ndarray:
    """What test_shift (step 17) made of ``img`` after ``k`` edits."""
    return ((img.astype(np.int64) + 17 * k) % 256).astype(np.uint8)


def test_multi_turn_run_chains_the_methods_own_edits_and_scores_final_turns(mbb, tmp_path, monkeypatch):
    """The runner feeds each self-fed turn the method's edit of the turn before (final-turn
    setting) and each single-turn sample the ground-truth previous output: with a method that
    shifts every pixel by 17 per edit, turn t of the chained run is the input shifted by 17 t, of
    the single-turn run the ground truth of turn t - 1 shifted by 17. Only final turns are scored
    (the paper's final-turn table); a failed turn skips the turns after it, with the reason."""
    from harness.cache import EditStore
    from harness.runner import run_job

    from . import _test_methods_registry  # noqa: F401  (test_shift, test_flaky)
    from .conftest import job_config

    res = tmp_path / "res"
    cfg = job_config(mbb.config(setting="multi_turn"), res, method={"name": "test_shift"}, metrics=L1_TARGET)
    out = run_job(cfg)
    edits = pd.read_parquet(out.job_dir / "edits.parquet").set_index("sample_id")
    assert sorted(edits.index) == ALL_IDS and (edits.status == "ok").all()
    single = run_job(job_config(mbb.config(setting="single_turn"), res, method={"name": "test_shift"},
                                metrics=L1_TARGET))
    s_edits = pd.read_parquet(single.job_dir / "edits.parquet").set_index("sample_id")
    assert (s_edits.status == "ok").all() and set(s_edits.edit_key).isdisjoint(edits.edit_key)

    store = EditStore(res / cfg["run_name"] / "edits")
    for img_id, turns in SESSIONS.items():
        first = mbb.arrays[f"{img_id}-input.png"]
        for t in range(1, turns + 1):
            sid = f"{img_id}_{t}"
            chained = store.get(edits.loc[sid, "edit_key"])
            alone = store.get(s_edits.loc[sid, "edit_key"])
            # final-turn setting: turn t was given the method's own edit of turn t - 1
            assert np.array_equal(chained.image(), _shift(first, t)), sid
            assert chained.meta["info"]["source_from"] == ("previous_edit" if t > 1 else None)
            # single-turn setting: turn t was given the ground-truth output of turn t - 1
            gt_before = first if t == 1 else mbb.arrays[f"{img_id}-output{t - 1}.png"]
            assert np.array_equal(alone.image(), _shift(gt_before, 1)), sid
            # the two settings coincide on a session's first turn only
            same = np.array_equal(chained.image(), alone.image())
            assert same == (t == 1), sid

    # final turns only, scored against the ground truth: L1 of the chained edit, by hand
    scores = pd.read_parquet(out.job_dir / "scores.parquet").set_index("sample_id")
    assert sorted(scores.index) == ["101_3", "202_1", "303_2"] and scores.value.notna().all()
    for img_id, turns in SESSIONS.items():
        final = _shift(mbb.arrays[f"{img_id}-input.png"], turns).astype(float)
        gt = mbb.arrays[f"{img_id}-output{turns}.png"].astype(float)
        expected = np.abs(final - gt).mean() / 255  # image_eval.py: mean |a - b| on [0, 1] tensors
        assert scores.loc[f"{img_id}_{turns}", "value"] == pytest.approx(expected, rel=1e-6)
    assert len(pd.read_parquet(single.job_dir / "scores.parquet")) == len(ALL_IDS)

    # a failing turn: the later turns of its session are skipped, naming it; nothing else changes
    monkeypatch.setenv("TEST_FLAKY_IDS", "101_2")
    flaky = job_config(mbb.config(setting="multi_turn"), tmp_path / "res2", method={"name": "test_flaky"},
                       metrics=L1_TARGET)
    e = pd.read_parquet(run_job(flaky).job_dir / "edits.parquet").set_index("sample_id")
    assert e.loc["101_2", "status"] == "failed" and e.loc["101_3", "status"] == "skipped"
    assert "previous turn '101_2'" in e.loc["101_3", "reason"]
    assert (e.drop(["101_2", "101_3"]).status == "ok").all()
    # once the failure is gone, a rerun edits exactly the two missing turns
    monkeypatch.setenv("TEST_FLAKY_IDS", "")
    again = run_job(flaky)
    assert again.computed == 2 and again.cached == 4
