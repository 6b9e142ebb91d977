from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (torch imported only when a gpu test was collected)."""
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only with --runslow; ``gpu`` tests only where CUDA is available."""
    runslow = config.getoption("--runslow")
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    has_cuda = cuda_available() if gpu else False
    for item in items:
        if not runslow and item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
    if not has_cuda:
        skip = pytest.mark.skip(reason="gpu: needs a CUDA device; torch.cuda.is_available() is False here")
        for item in gpu:
            item.add_marker(skip)


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 test image: smooth gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def disc_mask(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


class DatasetBuilder:
    """Writes a dataset in the generic on-disk format into a folder."""

    def __init__(self, root: Path, name: str = "synthetic"):
        self.root = root
        self.name = name
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        (root / "card.yaml").write_text(f"name: {name}\nformat: generic\nmanifest: manifest.jsonl\nversion: 1\n")

    def image(self, rel: str, arr: np.ndarray, **save_kw) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        Image.fromarray(arr).save(p, **save_kw)
        return rel

    def add(self, **record: Any) -> dict[str, Any]:
        self.records.append(record)
        self.write()
        return record

    def add_simple(self, sid: str, h: int = 48, w: int = 64, category: str = "remove", seed: int = 0, **extra) -> dict:
        src = self.image(f"images/{sid}.png", textured(h, w, seed))
        mask = self.image(f"masks/{sid}.png", disc_mask(h, w, h / 2, w / 2, min(h, w) / 4))
        rec = dict(
            id=sid, source=src, mask=mask, category=category, instruction="remove the thing",
            source_caption="a red thing", target_caption="a blue thing",
        )
        rec.update(extra)
        return self.add(**rec)

    def write(self) -> None:
        with open(self.root / "manifest.jsonl", "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "format": "generic", "root": str(self.root)}


@pytest.fixture
def builder(tmp_path) -> DatasetBuilder:
    return DatasetBuilder(tmp_path / "data")


def job_config(dataset_cfg: dict, results: Path, method: dict | None = None, metrics: dict | None = None, **kw):
    """A plain job config as the Hydra entry point would resolve it."""
    cfg = {
        "method": method or {"name": "identity"},
        "dataset": dataset_cfg,
        "metrics": metrics or {"protocol": "test", "regions": ["all", "edited", "unedited"],
                               "items": {"l1": {}, "l2": {}}},
        "run_name": "test",
        "results_dir": str(results),
        "cache_dir": None,
        "seed": 0,
        "progress": False,
    }
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for a test module of tiny models, restored afterwards.

    Tiny convolutions and attention are dominated by thread start-up cost: on a busy 2-core
    machine several intra-op threads make a 2-step tiny-UNet run up to ~50x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Tiny open_clip models (CLIP and Alpha-CLIP metric tests)
# --------------------------------------------------------------------------------------------
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def register_open_clip_config(folder, name: str, cfg: dict) -> None:
    """Make a tiny architecture known to open_clip by name (``create_model(name)``)."""
    import json

    import open_clip

    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    assert name in open_clip.list_models()


@pytest.fixture
def fresh_clip_features():
    """An empty in-process CLIP embedding cache before and after the test."""
    from harness.metrics import _clip_models

    _clip_models.FEATURES.clear()
    yield
    _clip_models.FEATURES.clear()


# --------------------------------------------------------------------------------------------
# Diffusion method tests
# --------------------------------------------------------------------------------------------
# A model-free protocol for method tests: L1 against the source on every region.
PIXEL_L1 = {"protocol": "pixel", "reference": "source", "region_rule": "area",
            "regions": ["all", "edited", "unedited"], "items": {"l1": {}}}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, downloads not allowed: real model ids are missing."""
    hub = tmp_path / "hf"
    (hub / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EDIT_HARNESS_ALLOW_DOWNLOADS", raising=False)
    return hub


# -- reading a job's tables -------------------------------------------------------------------
def read_edits(outcome) -> pd.DataFrame:
    """The job's edits table (one row a sample)."""
    return pd.read_parquet(outcome.job_dir / "edits.parquet")


def read_scores(outcome) -> pd.DataFrame:
    """The job's scores table (one row a sample, metric and region)."""
    return pd.read_parquet(outcome.job_dir / "scores.parquet")


# -- the whole harness on a tiny random-weight backbone -----------------------------------------
# (h, w) of the two samples add_two_samples writes
TWO_SIZES = {"a": (48, 64), "b": (40, 36)}


def add_two_samples(builder: DatasetBuilder, a: dict | None = None, b: dict | None = None) -> None:
    """Samples "a" (48 x 64, seed 1) and "b" (40 x 36, seed 2) of category change_color, as
    TWO_SIZES says; ``a`` / ``b``: more record fields of one of them."""
    for sid, seed, own in (("a", 1, a), ("b", 2, b)):
        h, w = TWO_SIZES[sid]
        builder.add_simple(sid, h=h, w=w, category="change_color", seed=seed, **(own or {}))


@dataclass
class TinyRun:
    """What run_tiny_job checked, for a test's method-specific assertions."""

    outcome: Any  # the first run's JobOutcome
    edits: pd.DataFrame  # its edits table, indexed by sample_id
    scores: pd.DataFrame  # its scores table
    records: dict[str, tuple[Any, dict[str, Any]]]  # sample id -> (EditRecord, info of edit.json)

    def info(self, sid: str) -> dict[str, Any]:
        return self.records[sid][1]


def run_tiny_job(cfg: dict, kind: str, sizes: dict[str, tuple[int, int]] = TWO_SIZES) -> TinyRun:
    """Run a job of a diffusion method on ``backbone=tiny`` twice and check what every such run shows.

    First run: every sample of ``sizes`` (id -> source (h, w)) edited and scored; every edit
    labelled as random weights of tiny backbone ``kind`` (edits table and edit.json); each stored
    edit an RGB image of its source's size; edit.json's steps, working size and seed those of
    ``cfg``, its ``auto_params`` the parameters ``cfg`` left at "auto"; every metric of ``cfg``
    scored on every sample, finite and > 0 on region ``all``
    (random weights change the image). Second run: everything from the cache.
    """
    from harness.cache import EditStore
    from harness.runner import _rss_bytes, build_method, run_job
    from methods._diffusion_common import RANDOM_WEIGHTS_TAG
    from methods.diffusion.tiny import RANDOM_WEIGHTS_LABEL

    n = len(sizes)
    first = run_job(cfg)
    edits = read_edits(first)
    assert first.counts == {"ok": n, "skipped": 0, "failed": 0}, edits.reason.tolist()
    assert first.computed == n and first.scored == n
    edits = edits.set_index("sample_id")
    assert sorted(edits.index) == sorted(sizes)
    assert (edits.model_revision == f"tiny-random-{kind}").all()
    assert all(RANDOM_WEIGHTS_TAG in m for m in edits.method)

    method = cfg["method"]
    res = method["resolution"]
    auto_resolved = build_method(method).params.auto_resolved
    store = EditStore(Path(cfg["results_dir"]) / cfg["run_name"] / "edits")
    records = {}
    for sid, (h, w) in sizes.items():
        rec = store.get(edits.loc[sid, "edit_key"])
        assert rec is not None, sid
        with Image.open(rec.folder / "edit.png") as im:
            assert im.size == (w, h) and im.mode == "RGB"
        info = json.loads((rec.folder / "edit.json").read_text())["info"]
        assert info["weights"] == RANDOM_WEIGHTS_LABEL and info["random_weights"] is True
        assert info["revision"] == f"tiny-random-{kind}"
        assert info["steps"] == method["num_inference_steps"] and info["seed"] == cfg["seed"]
        assert info["working_size_hw"] == [res, res]
        # the parameters the config left at "auto", as tiny mode resolved them (never one it set)
        assert info["auto_params"] == auto_resolved and not set(auto_resolved) & set(method)
        # torch on the CPU: peak memory is the resident-set increase (tracemalloc cannot see tensors)
        assert info["memory_probe"] == ("rss" if _rss_bytes() > 0 else "tracemalloc")
        records[sid] = (rec, info)

    scores = read_scores(first)
    assert set(scores.metric) == set(cfg["metrics"]["items"]) and set(scores.sample_id) == set(sizes)
    whole = scores.query("region == 'all'").value
    assert len(whole) == n * len(cfg["metrics"]["items"])
    assert np.isfinite(whole).all()
    # random weights: the image really changed (mean |difference| of more than two grey levels,
    # not one stray pixel)
    l1 = scores.query("region == 'all' and metric == 'l1'").value
    assert len(l1) == n and (l1 > 2 / 255).all(), l1.tolist()

    again = run_job(cfg)
    assert again.computed == 0 and again.cached == n and again.scored == 0
    return TinyRun(first, edits, scores, records)


# -- skips ------------------------------------------------------------------------------------------
def assert_skipped(outcome, reasons: dict[str, str]) -> pd.DataFrame:
    """Each sample named in ``reasons`` skipped with a reason naming it and holding the given
    text; every other sample edited. Returns the edits table indexed by sample_id."""
    edits = read_edits(outcome).set_index("sample_id")
    ok = [sid for sid in edits.index if sid not in reasons]
    assert outcome.counts == {"ok": len(ok), "skipped": len(reasons), "failed": 0}, edits.reason.tolist()
    for sid in ok:
        assert edits.loc[sid, "status"] == "ok", edits.loc[sid, "reason"]
    for sid, needle in reasons.items():
        reason = edits.loc[sid, "reason"]
        assert edits.loc[sid, "status"] == "skipped" and sid in reason and needle in reason, reason
    return edits


def assert_missing_weights(outcome, model: str, n: int = 2) -> pd.DataFrame:
    """Every one of the ``n`` samples skipped because ``model`` is not in the (empty) hub cache:
    the reason names the model, that the method could not be prepared and the backbone=tiny way
    out; the revision is ``uncached:<model>@main``; nothing scored. Returns the edits table."""
    assert outcome.counts == {"ok": 0, "skipped": n, "failed": 0}
    edits = read_edits(outcome)
    assert (edits.status == "skipped").all()
    for reason in edits.reason:
        assert model in reason and "could not be prepared" in reason and "backbone=tiny" in reason, reason
    assert (edits.model_revision == f"uncached:{model}@main").all()
    assert len(read_scores(outcome)) == 0
    return edits
