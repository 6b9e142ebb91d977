"""Set metrics over shards: each shard stores its edits' features, the merge replays them all in the
unsharded job's order and batches, so FID and KID over shards equal the unsharded values exactly,
and FID equals an independent recomputation from the formula."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.linalg

from harness.aggregate import load_run
from harness.cache import EditStore
from harness.data import open_dataset
from harness.metrics.base import SET_SAMPLE_ID
from harness.metrics.fid import FID, KID, InceptionSetMetric
from harness.registry import METRICS
from harness.runner import Job, JobConfig

from .conftest import job_config


def pixel_features(images):
    """A deterministic per-image feature (the Inception's stand-in): channel means, channel standard
    deviations and the mean of each image quadrant's grey level, 10-d float32."""
    out = []
    for im in images:
        x = np.asarray(im, np.float64) / 255.0
        g = x.mean(axis=2)
        h, w = g.shape
        quads = [g[: h // 2, : w // 2].mean(), g[: h // 2, w // 2 :].mean(), g[h // 2 :, : w // 2].mean(),
                 g[h // 2 :, w // 2 :].mean()]
        out.append(np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1)), quads]))
    return np.asarray(out, np.float32)


class _PixelFeatures:
    def __init__(self, **kw):
        super().__init__(**kw)
        self.set_feature_extractor(pixel_features, "pixel-moments")


class PixelFID(_PixelFeatures, FID):
    pass


class PixelKID(_PixelFeatures, KID):
    pass


for _name, _cls in (("test_pixel_fid", PixelFID), ("test_pixel_kid", PixelKID)):
    if _name not in METRICS.names():
        METRICS.register(_name)(_cls)

METRICS_CFG = {"protocol": "shards", "batch_size": 2, "regions": ["all"],
               "items": {"fid": {"metric": "test_pixel_fid", "stats_cache_dir": None},
                         "kid": {"metric": "test_pixel_kid", "stats_cache_dir": None, "kid_subsets": 7,
                                 "kid_subset_size": 4},
                         "l1": {}}}


def _run(dataset_cfg, results, **kw):
    cfg = job_config(dataset_cfg, results, method={"name": "inpaint"}, metrics=METRICS_CFG, **kw)
    return Job(JobConfig.from_mapping(cfg)).run(cfg)


def _frechet(x, y):
    """FID from the formula, independently of torchmetrics: ||mu_x - mu_y||^2 + Tr(Sx + Sy - 2 sqrt(Sx Sy))."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sx @ sy).real
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.trace(covmean))


@pytest.fixture
def data(builder):
    # 11 samples; s9 and s10 share s1's source image (counted once in the reference set, even when
    # the samples sit in different shards)
    for i in range(9):
        builder.add_simple(f"s{i}", seed=i, h=32 + 4 * (i % 3), w=40)
    for sid in ("s9", "s10"):
        builder.add_simple(sid, seed=1, h=36, w=40)
    return builder


def test_fid_kid_over_shards_equal_unsharded(data, tmp_path):
    ds = {**data.config(), "shard": None}  # as in every dataset YAML
    _run(ds, tmp_path / "one")
    for i in range(3):
        _run({**ds, "shard": f"{i}/3"}, tmp_path / "three", cache_dir=str(tmp_path / "cache3"))
    s1, _ = load_run(tmp_path / "one" / "test")
    s3, _ = load_run(tmp_path / "three" / "test")
    sets1 = s1[s1["sample_id"] == SET_SAMPLE_ID]
    assert sorted(zip(sets1["metric"], sets1["region"])) == [("fid", "all"), ("kid", "all"), ("kid", "std")]
    assert sets1["value"].notna().all() and (sets1["value"] != 0).all()
    # the same rows, bit for bit: the merge replays the same float32 features in the same order
    # and batches, so the float64 sums (and KID's seeded subsets) are the same computation
    pd.testing.assert_frame_equal(s3, s1, check_exact=True)

    # the formula, recomputed independently: edits (ok ones) vs the distinct source images
    dataset = open_dataset(ds)
    job = Job(JobConfig.from_mapping(job_config(ds, tmp_path / "one", method={"name": "inpaint"},
                                                metrics=METRICS_CFG)))
    edits, sources, seen = [], [], set()
    for ref in dataset.refs():
        rec = job.store.get(job.key_for(ref))
        assert rec is not None and rec.status.value == "ok"
        edits.append(rec.image())
        src = dataset.load(ref).source
        if src.tobytes() + bytes(src.shape) not in seen:
            seen.add(src.tobytes() + bytes(src.shape))
            sources.append(src)
    assert len(sources) == 9  # s9, s10 repeat s1's source
    want = _frechet(pixel_features(sources).astype(np.float64), pixel_features(edits).astype(np.float64))
    got = float(sets1[sets1["metric"] == "fid"]["value"].iloc[0])
    # float64 throughout; the eigenvalue route (torchmetrics) and scipy's sqrtm agree to rounding
    # amplified by the near-singular 10x10 covariances of 9-11 images
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_merged_set_value_is_cached_under_the_unsharded_key(data, tmp_path, monkeypatch):
    ds = {**data.config(), "shard": None}  # as in every dataset YAML
    cache = tmp_path / "cache"
    for i in range(2):
        _run({**ds, "shard": f"{i}/2"}, tmp_path, cache_dir=str(cache))
    scores, _ = load_run(tmp_path / "test")
    fid_row = scores[(scores["sample_id"] == SET_SAMPLE_ID) & (scores["metric"] == "fid")].iloc[0]
    cached = EditStore(cache).get_set_scores(fid_row["edit_key"])
    assert cached is not None and cached[0].value == fid_row["value"]

    # the next report reads the stored values: no replay
    def no_replay(self, *a, **kw):
        raise AssertionError("replayed although cached")

    monkeypatch.setattr(InceptionSetMetric, "replay", no_replay)
    again, _ = load_run(tmp_path / "test")
    pd.testing.assert_frame_equal(again, scores, check_exact=True)
    # an unsharded job sharing the cache finds the same set key, and so the same value
    out = _run(ds, tmp_path / "plain", cache_dir=str(cache))
    assert out.computed == 0
    plain, _ = load_run(tmp_path / "plain" / "test")
    pd.testing.assert_frame_equal(plain.drop(columns="run"), again.drop(columns="run"), check_exact=True)


def test_replay_equals_streaming_and_dedupes_references():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(13, 5)).astype(np.float32)
    refs = rng.normal(size=(6, 5)).astype(np.float32)
    hashes = [f"h{i % 6}" for i in range(13)]  # references repeat
    table = {f"h{i}": refs[i] for i in range(6)}
    m = FID(stats_cache_dir=None)
    m.set_feature_extractor(pixel_features, "x")
    got = m.replay(feats, hashes, table, batch_size=4)[0].value
    want = _frechet(refs.astype(np.float64), feats.astype(np.float64))
    assert got == pytest.approx(want, rel=1e-6)
    # batch size changes the float64 summation order only: equal to rounding
    assert m.replay(feats, hashes, table, batch_size=13)[0].value == pytest.approx(got, rel=1e-9)
