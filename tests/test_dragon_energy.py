"""DragonDiffusion / DiffEditor energy guidance (methods/dragon/energy.py, estimator.py) on the tiny
random-weight SD UNet: hand-checked energies, finite differences, the regional mix, counting."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harness.types import Sample
from methods.diffusion import counting, tiny
from methods.dragon import energy as E
from methods.dragon import tasks as T
from methods.dragon.estimator import FeatureEstimator
from tests.conftest import disc_mask, textured

WORK = 64  # working size: latent 8x8, feature grid 16x16 (cells of 4 px)


@pytest.fixture(scope="module")
def unet64():
    """The tiny SD UNet in float64 (finite differences), frozen."""
    return tiny.tiny_sd15()["unet"].double()


@pytest.fixture(scope="module")
def est(unet64):
    return FeatureEstimator(unet64)


def _sample(**kw) -> Sample:
    base = dict(id="e1", dataset="synthetic", source=textured(64, 64))
    base.update(kw)
    return Sample(**base)


def _task(kind: str) -> T.DragonTask:
    m = disc_mask(64, 64, 30, 34, 14)
    if kind == "drag":
        s = _sample(mask=m, source_points=np.array([[30.0, 28.0], [40.0, 36.0]]),
                    target_points=np.array([[38.0, 20.0], [44.0, 30.0]]))
    elif kind == "face":
        s = _sample(point_layout="dlib68", source_points=np.array([[20.0, 20.0], [40.0, 44.0]]),
                    target_points=np.array([[24.0, 22.0], [40.0, 36.0]]))
    elif kind == "move":
        obj = np.zeros((64, 64), bool)
        obj[20:36, 24:36] = True
        s = _sample(category="move", mask=obj, source_points=np.array([[30.0, 28.0]]),
                    target_points=np.array([[30.0 - 16, 28.0 + 8]]))
        return T.build_task(s, s.source, params={"move_mask": "object"})
    else:
        rm = np.zeros((48, 48), bool)
        rm[8:40, 12:36] = True
        s = _sample(category=kind, mask=m, reference=textured(48, 48, 5), reference_mask=rm)
    return T.build_task(s, s.source)


def _refs(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    refs = {"source": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)}
    if kind in ("paste", "appearance"):
        refs["reference"] = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    return refs


EMB_G = torch.Generator().manual_seed(7)
EMB = torch.randn(1, 77, 32, generator=EMB_G, dtype=torch.float64)
T_STEP = 601


# ------------------------------------------------------------------------------------------
# estimator
# ------------------------------------------------------------------------------------------
def test_estimator_returns_up_block_outputs_of_the_full_forward(est, unet64):
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    full, ran = {}, []
    hooks = [unet64.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: full.__setitem__(i, o)) for i in (1, 2)]
    try:
        with torch.no_grad():
            unet64(z, T_STEP, encoder_hidden_states=EMB)
    finally:
        for h in hooks:
            h.remove()
    h = unet64.conv_out.register_forward_hook(lambda *a: ran.append(1))
    try:
        with counting.counting() as tally:
            feats = est.features(z, T_STEP, EMB)
    finally:
        h.remove()
    # same kernels on the same inputs: bit-equal
    assert torch.equal(feats[0], full[1]) and torch.equal(feats[1], full[2])
    assert ran == []  # the forward stopped after up_blocks[2]: conv_out never ran
    assert tally.calls == {"estimator": 1} and tally.rows == {"estimator": 1}
    # differentiable wrt the latent
    zg = z.clone().requires_grad_(True)
    g = torch.autograd.grad(est.features(zg, T_STEP, EMB)[1].sum(), zg)[0]
    assert g.abs().sum() > 0


def test_estimator_refuses_the_counted_sampling_unet():
    unet = tiny.tiny_sd15()["unet"]
    counting.watch_module("unet", unet)
    with pytest.raises(ValueError, match="already counted as 'unet'"):
        FeatureEstimator(unet)
    with pytest.raises(ValueError, match="out of range"):
        FeatureEstimator(tiny.tiny_sd15()["unet"], up_ft_indices=(1, 5))


# ------------------------------------------------------------------------------------------
# hand-checked energies on synthetic features
# ------------------------------------------------------------------------------------------
def _const(v: torch.Tensor, hw=(8, 8)) -> torch.Tensor:
    """A feature map (1, C, h, w) with the vector v at every cell."""
    return v[None, :, None, None].expand(1, v.numel(), *hw).clone()


def _feats(sign: float = 1.0):
    v1 = torch.tensor([1.0, 2.0, -0.5, 3.0], dtype=torch.float64)
    v2 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    return [_const(sign * v1), _const(sign * v2)]


W = E.EnergyWeights(w_edit=3.0, w_content=5.0, w_contrast=0.7, w_inpaint=1.1)


@pytest.mark.parametrize("kind", ["drag", "face", "move", "paste", "appearance"])
def test_energies_of_identical_features(kind):
    # every similarity is 1: w / (1 + 4) terms and w * 1 terms, per the code's sums
    task = _task(kind)
    f = _feats()
    t = E.energy_terms(task, f, f, W, ref_raw=f)
    got = {k: float(t[k]) for k in ("edit", "content", "contrast", "inpaint")}
    exp = {
        # drag: sum over 2 scales x 2 points of w/5, / (2 * 2); inpaint w * 1 likewise; content sum / 2
        "drag": dict(edit=W.w_edit / 5, content=W.w_content / 5, contrast=0.0, inpaint=W.w_inpaint),
        "face": dict(edit=W.w_edit / 5, content=0.0, contrast=0.0, inpaint=0.0),
        # move: loss_scale 0.5 on 2 scales for edit / content / contrast; inpaint without it
        "move": dict(edit=W.w_edit / 5, content=W.w_content / 5, contrast=W.w_contrast, inpaint=2 * W.w_inpaint / 5),
        "paste": dict(edit=2 * W.w_edit / 5, content=2 * W.w_content / 5, contrast=0.0, inpaint=0.0),
        "appearance": dict(edit=2 * W.w_edit / 5, content=2 * W.w_content / 5, contrast=0.0, inpaint=0.0),
    }[kind]
    assert got == pytest.approx(exp, rel=1e-12)
    groups = {"move": (got["edit"], got["content"] + got["contrast"] + got["inpaint"]),
              "drag": (got["edit"] + got["inpaint"], got["content"])}.get(kind, (got["edit"], got["content"]))
    assert (float(t["E_edit"]), float(t["E_content"])) == pytest.approx(groups, rel=1e-12)


@pytest.mark.parametrize("kind", ["drag", "move", "paste", "appearance"])
def test_energies_of_opposite_features(kind):
    # cur = -src: cos = -1, sim = (cos + 1) / 2 = 0 -> w / 1; the move's edit and content terms
    # use the raw cosine: w / (1 - 4) = -w / 3
    task = _task(kind)
    t = E.energy_terms(task, _feats(-1.0), _feats(), W, ref_raw=_feats())
    got = {k: float(t[k]) for k in ("edit", "content", "contrast", "inpaint")}
    exp = {
        "drag": dict(edit=W.w_edit, content=W.w_content, contrast=0.0, inpaint=0.0),
        "move": dict(edit=-W.w_edit / 3, content=-W.w_content / 3, contrast=0.0, inpaint=2 * W.w_inpaint),
        "paste": dict(edit=2 * W.w_edit, content=2 * W.w_content, contrast=0.0, inpaint=0.0),
        "appearance": dict(edit=2 * W.w_edit, content=2 * W.w_content, contrast=0.0, inpaint=0.0),
    }[kind]
    assert got == pytest.approx(exp, rel=1e-12, abs=1e-12)


def _np_cos(a, b):
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _cells(mask: torch.Tensor):
    return [tuple(map(int, c)) for c in torch.nonzero(mask)]  # row-major order


def _up(f: np.ndarray, size) -> np.ndarray:
    """Nearest upsampling by an integer factor (here x2): cell (y, x) takes (y // k, x // k)."""
    k = size[0] // f.shape[-2]
    return f.repeat(k, axis=-2).repeat(k, axis=-1)


@pytest.mark.parametrize("kind", ["drag", "move", "paste", "appearance"])
def test_energies_match_an_independent_loop_implementation(kind):
    task = _task(kind)
    g = torch.Generator().manual_seed(3)
    mk = lambda: [torch.randn(1, 6, 8, 8, generator=g, dtype=torch.float64),
                  torch.randn(1, 5, 8, 8, generator=g, dtype=torch.float64)]
    cur, src, ref = mk(), mk(), mk()
    t = E.energy_terms(task, cur, src, W, ref_raw=ref)
    C = [_up(x[0].numpy(), (16, 16)) for x in cur]
    S = [_up(x[0].numpy(), (16, 16)) for x in src]
    R = [_up(x[0].numpy(), (16, 16)) for x in ref]
    M = task.energy_masks
    vec = lambda F_, cells: np.stack([F_[:, y, x] for y, x in cells])
    s01 = lambda a, b: (_np_cos(a, b) + 1) / 2
    exp = dict(edit=0.0, content=0.0, contrast=0.0, inpaint=0.0)
    if kind == "drag":
        for s in range(2):
            for mc, mt in zip(M["cur"], M["tar"]):
                a, b = vec(C[s], _cells(mc)), vec(S[s], _cells(mt))
                exp["edit"] += W.w_edit / (1 + 4 * np.mean([s01(x, y) for x, y in zip(a, b)]))
                vac = _cells(mt & ~mc)
                exp["inpaint"] += W.w_inpaint * np.mean([s01(C[s][:, y, x], S[s][:, y, x]) for y, x in vac])
            oth = _cells(M["other"])
            exp["content"] += W.w_content / (1 + 4 * np.mean([s01(S[s][:, y, x], C[s][:, y, x]) for y, x in oth]))
        exp = dict(edit=exp["edit"] / 4, inpaint=exp["inpaint"] / 4, content=exp["content"] / 2, contrast=0.0)
    elif kind == "move":
        for s in range(2):
            a, b = vec(C[s], _cells(M["cur"])), vec(S[s], _cells(M["tar"]))
            exp["edit"] += 0.5 * W.w_edit / (1 + 4 * np.mean([_np_cos(x, y) for x, y in zip(a, b)]))
            oth = _cells(M["other"])
            exp["content"] += 0.5 * W.w_content / (1 + 4 * np.mean([_np_cos(S[s][:, y, x], C[s][:, y, x]) for y, x in oth]))
            no = _cells(M["non_overlap"])
            exp["contrast"] += 0.5 * W.w_contrast * np.mean([s01(C[s][:, y, x], S[s][:, y, x]) for y, x in no])
            mc = vec(C[s], no).mean(0)
            ms = vec(S[s], _cells(M["inpaint_ref"])).mean(0)
            exp["inpaint"] += W.w_inpaint / (1 + 4 * s01(mc, ms))
    else:
        out = _cells(~M["base"])
        for s in range(2):
            exp["content"] += W.w_content / (1 + 4 * np.mean([s01(C[s][:, y, x], S[s][:, y, x]) for y, x in out]))
            a, b = vec(C[s], _cells(M["base"])), vec(R[s], _cells(M["ref"]))
            if kind == "paste":
                sim = np.mean([s01(x, y) for x, y in zip(a, b)])
            else:
                sim = s01(a.mean(0), b.mean(0))
            exp["edit"] += W.w_edit / (1 + 4 * sim)
    got = {k: float(t[k]) for k in exp}
    assert got == pytest.approx(exp, rel=1e-10, abs=1e-12)


def test_feature_grid_mismatch_is_an_error():
    task = _task("drag")
    f = [torch.zeros(1, 3, 4, 4, dtype=torch.float64)] * 2
    with pytest.raises(ValueError, match="feature grid"):
        E.energy_terms(task, f, f, W)


# ------------------------------------------------------------------------------------------
# guidance: scale 0, finite differences, the regional mix, counting
# ------------------------------------------------------------------------------------------
def test_energy_scale_zero_gives_exact_zeros_without_the_estimator(est):
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    for kind in ("drag", "paste"):
        eg = E.EnergyGuidance(est, _task(kind), energy_scale=0.0)
        with counting.counting() as tally:
            g = eg.gradient(z, T_STEP, _refs(kind), EMB)
        assert tally.calls == {} and g.shape == z.shape and g.dtype == z.dtype
        assert torch.equal(g, torch.zeros_like(z))


def _total(eg: E.EnergyGuidance, z: torch.Tensor, refs, which: str) -> float:
    with torch.no_grad():
        t = eg.energy(z, T_STEP, refs, EMB)
    return float(t["E_edit"] + t["E_content"]) if which == "sum" else float(t[which])


@pytest.mark.parametrize("kind", ["drag", "move", "paste", "face", "appearance"])
def test_plain_gradient_matches_central_differences(est, kind):
    # float64 throughout; central differences have error h^2 |E'''| / 6 ~ 1e-10 relative at
    # h = 1e-4 (the energy is smooth in z: masks are fixed, the UNet is smooth), rounding error
    # ~ 1e-16 / h = 1e-12: a relative tolerance of 1e-6 leaves a wide margin either way.
    task = _task(kind)
    refs = _refs(kind)
    eg = E.EnergyGuidance(est, task, energy_scale=0.7, weights=W, regional=False)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    grad = eg.gradient(z, T_STEP, refs, EMB) / (eg.factor * eg.scale)
    h = 1e-4
    for _ in range(3):
        v = torch.randn(z.shape, generator=g, dtype=torch.float64)
        fd = (_total(eg, z + h * v, refs, "sum") - _total(eg, z - h * v, refs, "sum")) / (2 * h)
        assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kind", ["drag", "move", "paste"])
def test_regional_mix_edit_inside_content_outside(est, kind):
    task = _task(kind)
    refs = _refs(kind)
    m = task.guidance_mask
    inside, outside = m.bool().expand(1, 4, 8, 8), ~m.bool().expand(1, 4, 8, 8)
    assert inside.any() and outside.any()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    eg = E.EnergyGuidance(est, task, energy_scale=0.7, weights=W, regional=True)
    g = eg.gradient(z, T_STEP, refs, EMB) / (eg.factor * eg.scale)
    # inside the guidance mask the mix is the edit energy's gradient, outside the content one's:
    # checked against central differences of each energy along directions supported there
    gen = torch.Generator().manual_seed(5)
    h = 1e-4
    for region, which in ((inside, "E_edit"), (outside, "E_content")):
        v = torch.randn(z.shape, generator=gen, dtype=torch.float64) * region
        fd = (_total(eg, z + h * v, refs, which) - _total(eg, z - h * v, refs, which)) / (2 * h)
        # 1e-5: the central difference's O(h^2) truncation error; over random latents it reached
        # 5.5e-6 relative (paste, ATEN_CPU_CAPABILITY=default), while a gradient taken on the wrong
        # region or energy is off by O(1)
        assert float((g * v).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # no content energy: nothing outside, exactly; no edit energy: nothing inside, exactly
    no_content = E.EnergyGuidance(est, task, energy_scale=0.7, regional=True,
                                  weights=dataclasses.replace(W, w_content=0.0, w_contrast=0.0, w_inpaint=0.0
                                                              if kind == "move" else W.w_inpaint))
    g1 = no_content.gradient(z, T_STEP, refs, EMB)
    assert torch.equal(g1[outside], torch.zeros_like(g1[outside])) and g1[inside].abs().sum() > 0
    no_edit = E.EnergyGuidance(est, task, energy_scale=0.7, regional=True,
                               weights=dataclasses.replace(W, w_edit=0.0, w_inpaint=W.w_inpaint if kind == "move" else 0.0))
    g2 = no_edit.gradient(z, T_STEP, refs, EMB)
    assert torch.equal(g2[inside], torch.zeros_like(g2[inside])) and g2[outside].abs().sum() > 0
    # the plain sum differs from the mix: both gradients act everywhere
    plain = E.EnergyGuidance(est, task, energy_scale=0.7, weights=W, regional=False).gradient(z, T_STEP, refs, EMB)
    assert not torch.allclose(plain, g * eg.factor * eg.scale)


def test_scale_factor_and_counts(est):
    task = _task("drag")
    refs = _refs("drag")
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    eg = E.EnergyGuidance(est, task, energy_scale=2.0)
    assert eg.scale == 2.0 and eg.factor == 4e-2 and eg.weights == E.DEFAULT_WEIGHTS["drag"]
    with counting.counting() as tally:
        g2 = eg.gradient(z, T_STEP, refs, EMB)
    assert tally.calls == {"estimator": 2}  # the source's features (no grad) + the current latent's
    with counting.counting() as tally:
        g2b = eg.gradient(z, T_STEP, refs, EMB)  # a repeated step (time travel): source features reused
    assert tally.calls == {"estimator": 1} and torch.equal(g2, g2b)
    one = E.EnergyGuidance(est, task, energy_scale=1.0, reuse_reference_features=False)
    with counting.counting() as tally:
        g1 = one.gradient(z, T_STEP, refs, EMB)
        one.gradient(z, T_STEP, refs, EMB)
    assert tally.calls == {"estimator": 4}
    # linear in the strength; the move's factor is 8e-2
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-12, atol=0)
    assert E.EnergyGuidance(est, _task("move"), energy_scale=1.0).factor == 8e-2
    # paste / appearance: base, reference and current features = 3 calls; the reference is required
    pt = E.EnergyGuidance(est, _task("paste"), energy_scale=1.5)
    with counting.counting() as tally:
        pt.gradient(z, T_STEP, _refs("paste"), EMB)
    assert tally.calls == {"estimator": 3}
    with pytest.raises(ValueError, match="refs\\['reference'\\]"):
        pt.gradient(z, T_STEP, {"source": refs["source"]}, EMB)


def test_gradient_under_no_grad_and_float32(est):
    # the sampler calls it inside torch.no_grad(); a float32 latent on the float64 estimator
    task = _task("face")
    z = torch.randn(1, 4, 8, 8)
    eg = E.EnergyGuidance(est, task, energy_scale=3.0)
    with torch.no_grad():
        g = eg.gradient(z, T_STEP, {"source": z.double() * 0.9}, EMB)
    assert g.dtype == torch.float32 and g.shape == z.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert set(eg.last_energies) >= {"E_edit", "E_content"} and eg.last_energies["E_content"] == 0.0


def test_default_weights_are_the_demo_sliders():
    # src/demo/demo.py slider defaults (cited in the YAMLs)
    assert E.DEFAULT_WEIGHTS["move"] == E.EnergyWeights(4, 6, 0.2, 0.8)
    assert E.DEFAULT_WEIGHTS["drag"] == E.EnergyWeights(4, 6, 0.0, 0.2)
    assert E.DEFAULT_WEIGHTS["face"].w_edit == 12 and E.DEFAULT_WEIGHTS["appearance"] == E.EnergyWeights(3.5, 5)
    assert E.DEMO_ENERGY_SLIDER == {"move": 0.5, "drag": 2.0, "face": 3.0, "appearance": 2.0, "paste": 1.5}
    # Sampler.edit's energy_scale = slider x 1e3 (model.py)
    assert E.DEFAULT_ENERGY_SCALE == {"move": 500.0, "drag": 2000.0, "face": 3000.0, "appearance": 2000.0, "paste": 1500.0}
    assert E.weights_for("drag", {"w_edit": 7, "w_content": None}) == E.EnergyWeights(7, 6, 0.0, 0.2)


def test_sd15_block_layout_gives_the_4px_feature_grid():
    # SD 1.5's UNet has four levels (tiny_sd15's has three): up_blocks[1] comes out at half the
    # latent size, up_blocks[2] at the latent size; x2 upsampling gives the 4-px grid of the masks.
    # Same block types as SD 1.5, small channels.
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ).eval()
    est4 = FeatureEstimator(unet)
    s = _sample(source=textured(128, 128), mask=disc_mask(128, 128, 60, 64, 30),
                source_points=np.array([[60.0, 56.0]]), target_points=np.array([[76.0, 40.0]]))
    task = T.build_task(s, s.source)
    assert task.latent_hw == (16, 16) and task.feat_hw == (32, 32)
    z = torch.randn(1, 4, 16, 16)
    emb = torch.randn(1, 77, 32)
    feats = est4.features(z, T_STEP, emb)
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 8), (16, 16)]
    g = E.EnergyGuidance(est4, task, energy_scale=2000.0).gradient(z, T_STEP, {"source": z * 0.8}, emb)
    assert g.shape == z.shape and torch.isfinite(g).all() and g.abs().sum() > 0
