"""FID / KID set metrics (harness/metrics/fid.py): math against closed forms, streaming,
reference caches, weights resolution (no network), and a random-weight Inception end to end."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from harness.metrics.base import ScoringItem, SetMetric
from harness.metrics.fid import FID, INCEPTION_FILE, KID, RANDOM_WEIGHTS
from harness.types import Sample


# -- helpers: images that encode an index, and an extractor that looks features up ------------
def code_image(side: int, idx: int) -> np.ndarray:
    """A 1x1 RGB image carrying (side, idx): side 0 = edit, 1 = reference."""
    return np.array([[[side, idx // 256, idx % 256]]], dtype=np.uint8)


class TableExtractor:
    """Features looked up from tables by the index coded in each image; counts images seen."""

    def __init__(self, edit_feats: np.ndarray, ref_feats: np.ndarray):
        self.tables = (edit_feats, ref_feats)
        self.calls = {0: 0, 1: 0}

    def __call__(self, images):
        out = []
        for im in images:
            side, idx = int(im[0, 0, 0]), int(im[0, 0, 1]) * 256 + int(im[0, 0, 2])
            self.calls[side] += 1
            out.append(self.tables[side][idx])
        return np.stack(out)


def coded_items(n: int) -> list[ScoringItem]:
    return [ScoringItem(Sample(id=f"s{i}", dataset="d", source=code_image(1, i)), edit=code_image(0, i))
            for i in range(n)]


def stream(metric: SetMetric, items, batch: int):
    metric.reset()
    for s in range(0, len(items), batch):
        metric.update(items[s : s + batch])
    return metric.compute_set()


def fid_closed_form(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def rand_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


@pytest.fixture
def gaussian():
    rng = np.random.default_rng(1234)
    d, n = 8, 5000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    s1, s2 = rand_spd(rng, d), rand_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)  # edits
    y = rng.multivariate_normal(mu2, s2, size=n)  # reference (sources)
    return dict(x=x, y=y, mu1=mu1, mu2=mu2, s1=s1, s2=s2, n=n)


# -- FID math --------------------------------------------------------------------------------
def test_fid_streamed_equals_closed_form_on_gaussian_features(gaussian):
    g = gaussian
    m = FID(stats_cache_dir=None)
    m.set_feature_extractor(TableExtractor(g["x"], g["y"]), "table")
    (row,) = stream(m, coded_items(g["n"]), 50)
    assert row.metric == "fid" and row.region == "all" and row.flag is None
    x, y = g["x"], g["y"]
    sample = fid_closed_form(y.mean(0), np.cov(y, rowvar=False), x.mean(0), np.cov(x, rowvar=False))
    assert row.value == pytest.approx(sample, rel=1e-6)
    population = fid_closed_form(g["mu2"], g["s2"], g["mu1"], g["s1"])
    assert row.value == pytest.approx(population, rel=0.05, abs=0.05)


def test_fid_batch_size_invariance(gaussian):
    g = gaussian
    items = coded_items(600)
    m = FID(stats_cache_dir=None)
    m.set_feature_extractor(TableExtractor(g["x"], g["y"]), "table")
    a = stream(m, items, 3)[0].value
    b = stream(m, items, 50)[0].value
    x, y = g["x"][:600], g["y"][:600]
    want = fid_closed_form(y.mean(0), np.cov(y, rowvar=False), x.mean(0), np.cov(x, rowvar=False))
    assert want > 1.0 and a == pytest.approx(want, rel=1e-6)
    # float64 sums accumulated in another order: differences at the 1e-15 level of the sums
    assert a == pytest.approx(b, rel=1e-9)


def test_too_few_and_source_dedupe(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 4))
    for cls in (FID, KID):
        m = cls(stats_cache_dir=None)
        m.set_feature_extractor(TableExtractor(feats, feats), "table")
        rows = stream(m, coded_items(1), 1)
        assert [r.region for r in rows] == list(m.regions())
        assert all(math.isnan(r.value) and r.flag == "too_few" for r in rows)
    # two edits of the same source image: the reference set has 1 distinct image -> too_few
    ext = TableExtractor(feats, feats)
    m = FID(stats_cache_dir=None)
    m.set_feature_extractor(ext, "table")
    src = code_image(1, 0)
    items = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=src.copy()), edit=code_image(0, i)) for i in range(3)]
    (row,) = stream(m, items, 2)
    assert row.flag == "too_few" and ext.calls == {0: 3, 1: 1}


def test_suite_common_keys_accepted_and_target_reference():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((20, 4)) + 1
    m = FID(reference="target", regions=("all", "edited"), region_rule="zero_fill", stats_cache_dir=None)
    ext = TableExtractor(x, y)
    m.set_feature_extractor(ext, "table")
    items = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=code_image(0, 19), target=code_image(1, i)),
                         edit=code_image(0, i)) for i in range(20)]
    (row,) = stream(m, items, 7)
    want = fid_closed_form(y.mean(0), np.cov(y, rowvar=False), x.mean(0), np.cov(x, rowvar=False))
    assert row.value == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        FID(reference="nonsense")
    with pytest.raises(TypeError):
        FID(no_such_param=1)


# -- KID math --------------------------------------------------------------------------------
def mmd_unbiased_numpy(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def test_kid_equals_numpy_unbiased_mmd():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = (rng.standard_normal((30, 16)) * 1.3 + 0.4).astype(np.float32)
    m = KID(stats_cache_dir=None, kid_subsets=5)
    m.set_feature_extractor(TableExtractor(x, y), "table")
    mean, std = stream(m, coded_items(30), 4)
    assert (mean.region, std.region) == ("all", "std")
    assert mean.flag == "subset_size=30"  # clipped from the default 1000
    want = mmd_unbiased_numpy(y.astype(np.float64), x.astype(np.float64))
    assert mean.value == pytest.approx(want, rel=1e-9)
    assert std.value == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_subsets_equal_numpy_per_subset():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    y = (rng.standard_normal((25, 12)) + 0.3).astype(np.float32)
    items = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=code_image(1, i % 25)), edit=code_image(0, i))
             for i in range(40)]
    m = KID(stats_cache_dir=None, kid_subsets=7, kid_subset_size=10, seed=3)
    m.set_feature_extractor(TableExtractor(x, y), "table")
    mean, std = stream(m, items, 6)
    assert mean.flag is None
    r = np.random.default_rng(3)  # the documented subset draw: permutation of ref, then of edits
    vals = []
    for _ in range(7):
        iy = r.permutation(25)[:10]
        ix = r.permutation(40)[:10]
        vals.append(mmd_unbiased_numpy(y[iy].astype(np.float64), x[ix].astype(np.float64)))
    assert mean.value == pytest.approx(np.mean(vals), rel=1e-9)
    assert std.value == pytest.approx(np.std(vals), rel=1e-9)


def test_kid_reservoir_is_bounded():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = (rng.standard_normal((50, 4)) + 0.5).astype(np.float32)
    m = KID(stats_cache_dir=None, kid_max_features=8, kid_subsets=3)
    m.set_feature_extractor(TableExtractor(x, y), "table")
    mean, std = stream(m, coded_items(50), 5)
    assert m._edits.rows.shape == (8, 4) and m._ref.rows.shape == (8, 4) and m._edits.n == m._ref.n == 50
    # the reservoir holds 8 distinct input rows, not only the first batches
    for kept, src in ((m._edits.rows, x), (m._ref.rows, y)):
        idx = [int(np.flatnonzero((src == r).all(axis=1))[0]) for r in kept]
        assert len(set(idx)) == 8 and max(idx) >= 10
    # and KID is the unbiased MMD^2 of those rows (subset size clipped to 8: every subset is all rows)
    assert mean.flag == std.flag == "subset_size=8"
    want = mmd_unbiased_numpy(m._ref.rows.astype(np.float64), m._edits.rows.astype(np.float64))
    assert abs(want) > 1e-3 and mean.value == pytest.approx(want, rel=1e-9)
    assert std.value == pytest.approx(0.0, abs=1e-12)


# -- reference caches ---------------------------------------------------------------------------
def content_extractor(calls: list[int]):
    def fn(images):
        calls.append(len(images))
        return np.stack([np.concatenate([im.reshape(-1, 3).mean(0), im.reshape(-1, 3).std(0)]) for im in images])
    return fn


def write_reference_dir(folder: Path, n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def random_items(n, seed=1, size=(10, 10)):
    rng = np.random.default_rng(seed)
    return [ScoringItem(Sample(id=f"s{i}", dataset="d", source=rng.integers(0, 256, (*size, 3), dtype=np.uint8)),
                        edit=rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("cls", [FID, KID])
def test_reference_dir_stats_cached_on_disk(tmp_path, cls):
    ref_dir, cache = tmp_path / "ref", tmp_path / "cache"
    write_reference_dir(ref_dir, 7)
    items = random_items(5)
    calls1: list[int] = []
    m1 = cls(reference_dir=str(ref_dir), stats_cache_dir=str(cache), max_batch=3)
    m1.set_feature_extractor(content_extractor(calls1), "content")
    first = stream(m1, items, 2)
    assert sum(calls1) == 5 + 7
    assert len(list(cache.glob("ref-*.npz"))) == 1

    calls2: list[int] = []
    m2 = cls(reference_dir=str(ref_dir), stats_cache_dir=str(cache), max_batch=3)
    m2.set_feature_extractor(content_extractor(calls2), "content")
    second = stream(m2, items, 2)
    assert sum(calls2) == 5  # edits only: the reference came from the cache
    assert [r.value for r in second] == pytest.approx([r.value for r in first], rel=1e-12)

    # another extractor identity, or a changed folder, is another key
    m3 = cls(reference_dir=str(ref_dir), stats_cache_dir=str(cache))
    calls3: list[int] = []
    m3.set_feature_extractor(content_extractor(calls3), "content-v2")
    stream(m3, items, 5)
    assert sum(calls3) == 5 + 7
    write_reference_dir(ref_dir / "more", 1, seed=5)
    calls4: list[int] = []
    m4 = cls(reference_dir=str(ref_dir), stats_cache_dir=str(cache))
    m4.set_feature_extractor(content_extractor(calls4), "content")
    stream(m4, items, 5)
    assert sum(calls4) == 5 + 8


def test_source_reference_features_cached_per_image(tmp_path):
    items = random_items(6, seed=4)
    calls1: list[int] = []
    m1 = FID(stats_cache_dir=str(tmp_path))
    m1.set_feature_extractor(content_extractor(calls1), "content")
    first = stream(m1, items, 4)[0].value
    assert sum(calls1) == 12
    calls2: list[int] = []
    m2 = FID(stats_cache_dir=str(tmp_path))
    m2.set_feature_extractor(content_extractor(calls2), "content")
    second = stream(m2, items, 4)[0].value
    assert sum(calls2) == 6  # the 6 edits; the 6 sources came from the cache
    assert second == pytest.approx(first, rel=1e-12)


# -- weights resolution ---------------------------------------------------------------------------
def test_available_names_weights_file_and_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    m = FID()
    reason = m.available()
    assert reason is not None and INCEPTION_FILE in reason
    assert "weights_path" in reason and str(tmp_path / "torch_home" / "hub" / "checkpoints") in reason
    assert "allow_random_weights" in reason
    assert "unavailable" in m.weights()
    bad = FID(weights_path=str(tmp_path / "nope.pth"))
    assert "nope.pth" in bad.available()

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).write_bytes(b"not really weights")
    found = FID()
    assert found.available() is None and str(hub / INCEPTION_FILE) in found.weights()

    r = KID(allow_random_weights=True, weights_path=None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    assert r.available() is None and RANDOM_WEIGHTS in r.weights()


def test_module_import_does_not_import_torch():
    code = "import sys, harness.metrics.fid; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- random-weight Inception end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def no_download():
    """Any attempt to download weights fails the test."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def boom(*a, **k):
        raise AssertionError("a download was attempted")

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.hub, "load_state_dict_from_url", boom)
    mp.setattr(tfi, "load_state_dict_from_url", boom)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory, no_download):
    """The seeded random-weight FID Inception written as a weights file (torchmetrics, torch-fidelity
    and the metric all load it)."""
    import torch

    from harness.metrics.fid import load_inception

    f = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(load_inception(None, antialias=True, random_seed=0).state_dict(), f)
    return f


def test_random_weight_inception_end_to_end(tmp_path, monkeypatch, no_download, inception_file):
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for _ in range(3)]
    others = [np.clip(im.astype(int) // 2 + 60, 0, 255).astype(np.uint8) for im in imgs]
    same = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=im), edit=im.copy()) for i, im in enumerate(imgs)]

    fid = FID(allow_random_weights=True, stats_cache_dir=str(tmp_path / "c"))
    assert fid.available() is None and RANDOM_WEIGHTS in fid.weights()
    (row,) = stream(fid, same, 2)
    feats = fid.extract(imgs).astype(np.float64)
    scale = float(np.trace(np.cov(feats, rowvar=False)))
    # identical sets: FID 0 up to the square root of a rank-2 product (eigenvalues ~1e-12 of scale)
    assert scale > 1e-3 and row.flag is None and abs(row.value) < 1e-4 * scale
    # KID of identical sets is the unbiased MMD^2 of the features with themselves (not 0: the cross
    # term keeps its diagonal); 3 rows < subset size, so every subset is all rows
    mean, std = stream(KID(allow_random_weights=True, stats_cache_dir=None), same, 2)
    assert mean.flag == "subset_size=3"
    want = mmd_unbiased_numpy(feats, feats)
    assert want != 0 and mean.value == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert std.value == pytest.approx(0.0, abs=1e-12)

    # default mode is exactly torchmetrics' FID (same weights from the same file)
    wfile = inception_file
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(wfile))
    x_real = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
    x_fake = torch.from_numpy(np.stack(others).transpose(0, 3, 1, 2).copy())
    tm.update(x_real, real=True)
    tm.update(x_fake, real=False)
    want = float(tm.compute())
    ours = FID(weights_path=str(wfile), stats_cache_dir=None)
    assert "RANDOM" not in ours.weights() and str(wfile) in ours.weights()
    diff = [ScoringItem(Sample(id=f"s{i}", dataset="d", source=a), edit=b) for i, (a, b) in enumerate(zip(imgs, others))]
    got = stream(ours, diff, 2)[0].value
    # rel 1e-4: both take float64 moments of the same features, but the rank-2 covariances of 3
    # images make the eigenvalue square roots sensitive to the order of the float64 sums
    assert got > 1e-3 and got == pytest.approx(want, rel=1e-4)
    with torch.no_grad():
        # the same network, input and batch (one group of 3 equal-size images): same computation
        np.testing.assert_array_equal(ours.extract(imgs), tm.inception(x_real).numpy())

    # torch_fidelity mode = torch-fidelity's own extractor (its TF1 resize, no antialias)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(wfile))
    with torch.no_grad():
        (tf_feats,) = tf(x_real)
    tfm = FID(weights_path=str(wfile), mode="torch_fidelity", stats_cache_dir=None).extract(imgs)
    # torchmetrics' network runs its copy of torch-fidelity's forward, calling the same TF1 resize
    # function and layers on the same batch: the same computation
    np.testing.assert_array_equal(tfm, tf_feats.numpy())
    # the two resizes really differ (so the equalities above tell the modes apart)
    assert np.abs(tfm - ours.extract(imgs)).max() > 1e-4


# -- clean mode = clean-fid ---------------------------------------------------------------------
def test_clean_resize_equals_clean_fid_resizer():
    """clean-fid's own 'clean' resizer (cleanfid.resize.build_resizer) on the same arrays: the same
    PIL float ('F') bicubic per channel and clip, so bit-identical, for up- and downsampling,
    non-square and already-299 images."""
    from cleanfid.resize import build_resizer

    from harness.metrics.fid import clean_resize

    theirs = build_resizer("clean")
    rng = np.random.default_rng(5)
    for shape in [(24, 20), (299, 299), (512, 384), (7, 300), (333, 301)]:
        im = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        got, want = clean_resize(im), theirs(im)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (299, 299, 3)
        np.testing.assert_array_equal(got, want)
        if shape != (299, 299):
            assert np.any(got != np.round(got))  # not re-quantised to uint8
        assert got.min() >= 0 and got.max() <= 255


def test_clean_mode_features_equal_clean_fid_pipeline(tmp_path, inception_file):
    """Mode ``clean`` = clean-fid's feature pipeline (its folder reader, ResizeDataset 'clean' resize,
    float tensors, DataLoader batches) feeding torch-fidelity's network after its resize step, which
    is what clean-fid's TorchScript Inception computes: (x - 128) / 128, then the layers."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from cleanfid.fid import get_folder_features
    from PIL import Image

    rng = np.random.default_rng(11)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, shape in enumerate([(40, 30), (40, 30), (64, 80), (17, 23)]):  # mixed sizes in one batch
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    files = sorted(folder.glob("*.png"))
    imgs = [np.asarray(Image.open(f).convert("RGB")) for f in files]

    tf = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    mp = pytest.MonkeyPatch()

    def network_after_resize(x):  # x: float N x 3 x 299 x 299 in [0, 255], resized by clean-fid
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 299, 299)
        mp.setattr(tfi, "interpolate_bilinear_2d_like_tensorflow1x", lambda t, size, align_corners: x)
        try:
            (f,) = tf(torch.zeros(x.shape, dtype=torch.uint8))  # the uint8 placeholder is replaced by x
        finally:
            mp.undo()
        return f

    with torch.no_grad():
        want = get_folder_features(str(folder), model=network_after_resize, num_workers=0, batch_size=len(files),
                                   device=torch.device("cpu"), mode="clean", verbose=False)
    got = FID(weights_path=str(inception_file), mode="clean", stats_cache_dir=None).extract(imgs)
    assert got.shape == want.shape == (4, 2048)
    # same resize (bit-identical, above), same layers, one batch of 4 on both sides; the tolerance
    # only allows float32 reassociation (~1e-7 of features of size ~0.3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the other resizes give other features, far outside that tolerance
    tm_mode = FID(weights_path=str(inception_file), stats_cache_dir=None).extract(imgs)
    assert np.abs(tm_mode - want).max() > 1e-3


def test_kid_formula_equals_clean_fid(gaussian):
    """clean-fid's KID loop (cleanfid.fid.kernel_distance) on the same features: with one subset of
    all rows no randomness is left, and it is the unbiased MMD^2 of the cubic kernel. (Its Fréchet
    distance is scipy's sqrtm formula, already the reference of the FID tests above; it passes
    scipy's ``disp`` argument, which SciPy 1.18 removes, so it is not called here.)"""
    from cleanfid.fid import kernel_distance

    from harness.metrics.fid import kid_from_features

    fx, fy = gaussian["x"][:300].astype(np.float32), gaussian["y"][:300].astype(np.float32)
    mean, std, m = kid_from_features(fy, fx, subsets=3, subset_size=1000)
    assert m == 300 and std == pytest.approx(0.0, abs=1e-12)
    cf = kernel_distance(fy.astype(np.float64), fx.astype(np.float64), num_subsets=1, max_subset_size=300)
    # float64 on both sides, sums in another order: ~1e-15 relative
    assert abs(cf) > 1e-3 and mean == pytest.approx(cf, rel=1e-9)
