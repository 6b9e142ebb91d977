"""DragGAN (methods/draggan.py) on the random-weight tiny StyleGAN2 generator: the drag step's
pieces against hand-computed values, the stopping rule, and the adapter through the harness."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

import methods.draggan  # noqa: E402,F401  (registers the method)
from harness.cache import EditStore  # noqa: E402
from harness.registry import METHODS  # noqa: E402
from harness.runner import run_job  # noqa: E402
from methods.draggan import drag, motion_loss, scaled_radius, track_points  # noqa: E402
from methods.stylegan2.generator import tiny_generator  # noqa: E402

from .conftest import REPO, job_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
FACES = ["astronaut_smile", "grace_hopper_shift_right"]


def _w0(G, seed=3):
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z, truncation_psi=0.7)


def test_handles_on_targets_run_zero_steps_and_return_g_of_w():
    G = tiny_generator()
    w0 = _w0(G)
    pts = np.array([[10.0, 12.0], [20.0, 5.0]])
    res = drag(G, w0, pts, pts.copy(), r1=24, r2=96, feature_block=2, max_steps=50)
    assert res.steps == 0 and res.stopped and res.losses == []
    assert torch.equal(res.ws, w0)
    with torch.no_grad():
        assert torch.equal(res.image, G.synthesis(w0))


def test_stop_distance_is_the_codes():
    # within max(2 R / 512, 2) = 2 px of the target (R = 32): no step
    G = tiny_generator()
    res = drag(G, _w0(G), np.array([[10.0, 10.0]]), np.array([[12.0, 10.0]]), r1=24, r2=96, feature_block=2)
    assert res.steps == 0 and res.stopped
    res = drag(G, _w0(G), np.array([[10.0, 10.0]]), np.array([[13.0, 10.0]]), r1=24, r2=96, feature_block=2,
               max_steps=1)
    assert res.steps == 1 and not res.stopped


def test_radius_scaling_as_the_code():
    assert scaled_radius(3, 512) == 3 and scaled_radius(12, 256) == 6 and scaled_radius(3, 1024) == 6
    assert scaled_radius(24, 32) == 2 and scaled_radius(96, 32) == 6


def test_point_tracking_finds_a_moved_feature():
    g = torch.Generator().manual_seed(0)
    feat0 = torch.randn(1, 8, 20, 20, generator=g)
    ref = feat0[0, :, 5, 7].clone()  # the handle's feature at (x, y) = (7, 5)
    moved = torch.roll(feat0, shifts=(2, -3), dims=(2, 3))  # content moved by dx = -3, dy = +2
    assert track_points(moved, [ref], [(7, 5)], r=4) == [(4, 7)]
    # outside the r2 square the feature is not found: the answer stays inside the square
    (x, y), = track_points(moved, [ref], [(7, 5)], r=2)
    assert (x, y) != (4, 7) and abs(x - 7) <= 2 and abs(y - 5) <= 2
    # clipped at the border
    (x, y), = track_points(feat0, [feat0[0, :, 0, 0]], [(1, 1)], r=3)
    assert (x, y) == (0, 0)


def test_motion_loss_hand_computed():
    # features = the x coordinate in every channel: a unit step towards the target (+x) samples x + 1,
    # so every pixel within r1 has |f - f(q + d)| = 1 and the L1 loss is exactly 1
    h = w = 16
    xs = torch.arange(w, dtype=torch.float32)[None, None, None].expand(1, 3, h, w).contiguous()
    assert motion_loss(xs, [(8, 8)], np.array([[14.0, 8.0]]), r1=3).item() == pytest.approx(1.0, abs=1e-6)
    # towards -y on the same map: no change in x -> 0; within 1 px of the target: no term
    assert motion_loss(xs, [(8, 8)], np.array([[8.0, 2.0]]), r1=3).item() == pytest.approx(0.0, abs=1e-6)
    assert motion_loss(xs, [(8, 8)], np.array([[8.5, 8.0]]), r1=3).item() == 0.0
    # diagonal: the step is (1, 1) / sqrt(2): loss = 1 / sqrt(2)
    assert motion_loss(xs, [(8, 8)], np.array([[12.0, 12.0]]), r1=3).item() == pytest.approx(2 ** -0.5, abs=1e-6)


def test_motion_supervision_gradient_is_finite_and_nonzero():
    import torch.nn.functional as F

    G = tiny_generator()
    w0 = _w0(G)
    w = w0[:, :6].clone().requires_grad_(True)
    _, feats = G.synthesis(torch.cat([w, w0[:, 6:]], 1), return_features=True)
    feat = F.interpolate(feats[2], [32, 32], mode="bilinear")
    loss = motion_loss(feat, [(10, 16)], np.array([[22.0, 16.0]]), r1=2)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_drag_optimises_only_the_first_layers_and_tracks_the_handle():
    G = tiny_generator()
    w0 = _w0(G)
    res = drag(G, w0, np.array([[10.0, 16.0]]), np.array([[24.0, 16.0]]), r1=48, r2=96, feature_block=2,
               lr=2e-2, max_steps=12)
    assert res.steps == 12 and len(res.losses) == 12 and np.isfinite(res.losses).all()
    assert not torch.equal(res.ws[:, :6], w0[:, :6])
    assert torch.equal(res.ws[:, 6:], w0[:, 6:])  # the renderer's ws[:, 6:] = w0[:, 6:]
    # the handle is re-tracked every step, inside the r2 square around its last position
    (x, y), = res.points
    assert 0 <= x < 32 and 0 <= y < 32 and max(abs(x - 10), abs(y - 16)) <= 12 * scaled_radius(96, 32)
    with torch.no_grad():
        assert torch.equal(res.image, G.synthesis(res.ws))


def test_fixed_region_term_only_with_a_two_valued_mask():
    G = tiny_generator()
    w0 = _w0(G)
    kw = dict(r1=48, r2=96, feature_block=2, lr=2e-2, max_steps=3)
    args = (G, w0, np.array([[10.0, 16.0]]), np.array([[24.0, 16.0]]))
    plain = drag(*args, **kw)
    ones = drag(*args, fixed_mask=torch.ones(32, 32), **kw)  # one value: the code skips the term
    assert ones.losses == plain.losses
    half = torch.ones(32, 32)
    half[:, :16] = 0
    masked = drag(*args, fixed_mask=half, lambda_mask=20.0, **kw)
    assert masked.losses[0] == pytest.approx(plain.losses[0])  # step 1: features = feat0
    assert masked.losses[1] != plain.losses[1]


def _sample_cfg():
    return {"name": "sample", "format": "generic", "root": str(REPO / "datasets" / "sample"), "ids": FACES}


def test_runs_through_the_harness_on_the_face_samples(tmp_path):
    method = {"name": "draggan", "backbone": "tiny", "inversion_steps": 4, "tune_steps": 2}
    out = run_job(job_config(_sample_cfg(), tmp_path, method=method))
    assert out.counts["ok"] == 2, out.counts
    e = pd.read_parquet(out.job_dir / "edits.parquet")
    assert set(e.sample_id) == set(FACES)
    assert e.method.str.contains("RANDOM WEIGHTS").all()
    store = EditStore(tmp_path / "test" / "edits")
    for key, sid in zip(e.edit_key, e.sample_id):
        rec = store.get(key)
        img = rec.image()
        assert img.dtype == np.uint8 and img.ndim == 3
        info = rec.meta["info"]
        assert info["random_weights"] and info["inversion"]["pivotal_tuning"]
        calls = info["network_calls"]
        # 4 projector + 2 tuning steps, each drag step's synthesis, one final synthesis
        assert info["inversion"]["steps"] == 4 and info["inversion"]["tune_steps_run"] == 2
        assert calls["generator"] == 4 + 2 + info["drag_steps"] + 1
        assert calls["lpips"] == 4 + 2 and calls["generator_mapping"] == 1
    assert (e.prep_seconds > 0).all()


def test_edit_with_a_long_drag_runs_drag_steps():
    from harness.types import Sample
    from .conftest import textured

    cls = METHODS.get("draggan")
    m = cls(cls.parse_params({"backbone": "tiny", "inversion_steps": 2, "tune_steps": 0, "max_steps": 3}))
    mask = np.zeros((64, 64), bool)
    mask[10:50, 10:60] = True
    s = Sample(id="long", dataset="d", source=textured(64, 64), source_points=np.array([[20.0, 32.0]]),
               target_points=np.array([[50.0, 32.0]]), mask=mask)
    out = m.edit(s, 0)
    info = out.info
    assert out.image.shape == (64, 64, 3) and info["drag_steps"] == 3 and not info["reached_targets"]
    assert info["mask_term"] and not info["inversion"]["pivotal_tuning"]
    assert info["network_calls"]["generator"] == 2 + 3 + 1


def test_missing_generator_is_a_clear_skip(tmp_path):
    cls = METHODS.get("draggan")
    m = cls(cls.parse_params({}))
    (what, problem), *_ = m.weights_status()
    assert "generator_path" in problem
    from methods.diffusion.loading import MissingWeights

    with pytest.raises(MissingWeights, match="method.generator_path"):
        m.prepare()
    m = cls(cls.parse_params({"generator_path": str(tmp_path / "nope.pkl")}))
    with pytest.raises(MissingWeights, match="nope.pkl' does not exist"):
        m.prepare()
    out = run_job(job_config(_sample_cfg(), tmp_path, method={"name": "draggan"}))
    assert out.counts["skipped"] == 2
    reasons = pd.read_parquet(out.job_dir / "edits.parquet").reason
    assert reasons.str.contains("generator_path").all()


def test_bad_points_are_a_skip_reason():
    from harness.types import Sample

    cls = METHODS.get("draggan")
    m = cls(cls.parse_params({"backbone": "tiny"}))
    src = np.zeros((16, 16, 3), np.uint8)
    s = Sample(id="s", dataset="d", source=src, source_points=np.zeros((3, 2)), target_points=np.zeros((2, 2)))
    assert "3 source_points but 2 target_points" in m.cannot_handle(s)
    s = Sample(id="s", dataset="d", source=src, source_points=np.zeros((3,)), target_points=np.zeros((3, 2)))
    assert "'source_points'" in m.cannot_handle(s)
    s = Sample(id="s", dataset="d", source=src, source_points=None, target_points=np.zeros((3, 2)))
    assert "source_points" in m.cannot_handle(s)
