"""The plain-PyTorch StyleGAN2 generator (methods/stylegan2/generator.py), its checkpoint loaders,
and GAN inversion (methods/stylegan2/inversion.py), on the random-weight tiny generator."""
from __future__ import annotations

import collections
import pickle
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from methods.stylegan2 import generator as sg  # noqa: E402
from methods.stylegan2.generator import (CheckpointError, Generator, GeneratorConfig, load_generator,  # noqa: E402
                                         modulated_conv2d, setup_filter, tiny_generator, upfirdn2d)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _z(n=2, seed=1):
    return torch.randn(n, sg.TINY_CONFIG.z_dim, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_layout():
    G = tiny_generator()
    img, feats = G(_z(), return_features=True)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    assert [f.shape[-1] for f in feats] == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == list(sg.TINY_CONFIG.channels)
    # NVIDIA's w count: 1 conv at 4 px + 2 per further block + the last toRGB
    assert G.num_ws == 1 + 2 * 3 + 1 == G.mapping(_z()).shape[1]
    big = Generator(GeneratorConfig.nvidia(1024))
    assert big.num_ws == 18 and big.synthesis.b1024.conv1.weight.shape == (32, 32, 3, 3)
    keys = set(big.state_dict())  # NVIDIA's key names
    for k in ("mapping.fc7.weight", "mapping.w_avg", "synthesis.b4.const", "synthesis.b4.conv1.affine.bias",
              "synthesis.b8.conv0.noise_const", "synthesis.b8.conv0.resample_filter", "synthesis.b8.resample_filter",
              "synthesis.b1024.torgb.weight", "synthesis.b64.conv1.noise_strength"):
        assert k in keys, k


def test_deterministic():
    a, b = tiny_generator(), tiny_generator()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(a(_z()), b(_z()))
    assert torch.equal(a(_z()), a(_z()))
    assert not torch.equal(a(_z(seed=1)), a(_z(seed=2)))


def test_truncation_psi_zero_gives_w_avg():
    G = tiny_generator()
    w = G.mapping(_z(), truncation_psi=0.0)
    assert torch.allclose(w, G.mapping.w_avg.expand_as(w), atol=0, rtol=0)


def test_state_dict_round_trip(tmp_path):
    G = tiny_generator()
    sg.save_state_dict(G, tmp_path / "g.pt")
    G2 = load_generator(tmp_path / "g.pt")
    assert G2.config == G.config  # the architecture read off the shapes
    z = _z()
    assert torch.equal(G(z), G2(z))  # same kernels, same shapes: bit-identical
    torch.save(G.state_dict(), tmp_path / "bare.pth")  # a bare state dict too
    assert torch.equal(load_generator(tmp_path / "bare.pth")(z), G(z))


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "nope.pt")
    torch.save({"g_ema": {"convs.0.conv.weight": torch.zeros(1)}}, tmp_path / "rosinality.pt")
    with pytest.raises(CheckpointError, match="rosinality"):
        load_generator(tmp_path / "rosinality.pt")
    sd = tiny_generator().state_dict()
    sd["mapping.embed.weight"] = torch.zeros(32, 10)
    torch.save(sd, tmp_path / "cond.pt")
    with pytest.raises(CheckpointError, match="conditional"):
        load_generator(tmp_path / "cond.pt")
    sd = tiny_generator().state_dict()
    del sd["synthesis.b8.conv0.noise_strength"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_generator(tmp_path / "broken.pt")


# -- NVIDIA network pickles ------------------------------------------------------------------------
def _fake_nvidia_modules(monkeypatch):
    """Stand-ins for NVIDIA's ``torch_utils.persistence`` and ``dnnlib`` so that a pickle written here
    names the same globals a real snapshot does."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called here: we only write
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    dnnlib_util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    dnnlib_util.EasyDict = EasyDict
    for name, mod in (("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                      ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", dnnlib_util)):
        monkeypatch.setitem(sys.modules, name, mod)
    return _reconstruct_persistent_obj, EasyDict


class _Persisted:
    """Pickles like a ``persistence``-decorated module: its class source plus its state."""

    def __init__(self, fn, class_name, state):
        self.fn, self.class_name, self.state = fn, class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="import os\nos.system('echo pwned')\n",
                    class_name=self.class_name, state=self.state)
        return self.fn, (meta,)


def _persist(module, fn, EasyDict, class_name="Generator", init_kwargs=None):
    state = {"training": False,
             "_parameters": collections.OrderedDict((k, v.detach().clone()) for k, v in module._parameters.items()),
             "_buffers": collections.OrderedDict((k, v.clone()) for k, v in module._buffers.items()),
             "_non_persistent_buffers_set": set(),
             "_modules": collections.OrderedDict((k, _persist(m, fn, EasyDict, type(m).__name__))
                                                 for k, m in module._modules.items()),
             "init_kwargs": EasyDict(init_kwargs or {})}
    return _Persisted(fn, class_name, state)


def test_nvidia_pickle_loads_without_running_its_code(tmp_path, monkeypatch, capfd):
    fn, EasyDict = _fake_nvidia_modules(monkeypatch)
    G = tiny_generator()
    kwargs = {"z_dim": 32, "c_dim": 0, "synthesis_kwargs": EasyDict(conv_clamp=256), "mapping_kwargs": EasyDict()}
    snapshot = {"G": None, "D": None, "G_ema": _persist(G, fn, EasyDict, init_kwargs=kwargs),
                "training_set_kwargs": EasyDict(resolution=32)}
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps(snapshot, protocol=4))
    monkeypatch.undo()  # reading must not need NVIDIA's modules
    G2 = load_generator(path)
    assert "pwned" not in capfd.readouterr().out
    assert G2.config.conv_clamp == 256  # from the pickle's init_kwargs
    z = _z()
    ref = Generator(G.config.__class__(**{**G.config.__dict__, "conv_clamp": 256}))
    ref.load_state_dict(G.state_dict())
    assert torch.equal(G2(z), ref.eval()(z))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os|nt)\.system"):
        load_generator(path)


# -- the operations against independent re-computations --------------------------------------------
def test_upfirdn2d_equals_direct_convolution():
    from scipy.signal import convolve2d

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 5, 6)).astype(np.float64)
    f = setup_filter().double()
    for up, down, pad, gain in ((2, 1, (2, 1, 2, 1), 4.0), (1, 1, (1, 2, 0, 3), 1.0), (1, 2, (1, 1, 1, 1), 1.0),
                                (2, 1, (-1, 3, 2, -1), 4.0)):
        out = upfirdn2d(torch.from_numpy(x), f, up=up, down=down, padding=pad, gain=gain).numpy()
        for c in range(2):
            z = np.zeros((5 * up, 6 * up))
            z[::up, ::up] = x[0, c]
            px0, px1, py0, py1 = pad
            z = np.pad(z, ((max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
            z = z[max(-py0, 0): z.shape[0] - max(-py1, 0), max(-px0, 0): z.shape[1] - max(-px1, 0)]
            ref = convolve2d(z, f.numpy() * gain, mode="valid")[::down, ::down]  # a true convolution
            np.testing.assert_allclose(out[0, c], ref, rtol=1e-12, atol=1e-12)


def _reference_modconv(x, weight, styles, demodulate, up, padding):
    """Per sample, from the formula (paper eq. 1-3): w' = s * w, w'' = w' / sqrt(sum w'^2 + 1e-8);
    ``up=2`` as NVIDIA's reference path of conv2d_resample: zero insertion, the FIR filter with gain 4
    (padding 3, 2), then a true convolution (flipped kernel) -- not the transposed convolution ours uses."""
    outs = []
    f = setup_filter().to(x.dtype)
    for b in range(x.shape[0]):
        w = weight * styles[b][None, :, None, None]
        if demodulate:
            w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if up == 1:
            outs.append(F.conv2d(x[b:b + 1], w, padding=padding))
        else:
            xb = x[b:b + 1]
            c = xb.shape[1]
            z = torch.zeros(1, c, xb.shape[2] * 2, xb.shape[3] * 2, dtype=xb.dtype)
            z[:, :, ::2, ::2] = xb
            k = (f * 4).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
            y = F.conv2d(F.pad(z, [3, 2, 3, 2]), k, groups=c)
            outs.append(F.conv2d(y, w.flip([2, 3])))
    return torch.cat(outs)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_formula(up, demodulate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    styles = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ours = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, padding=1,
                            resample_filter=setup_filter().double())
    ref = _reference_modconv(x, weight, styles, demodulate, up, 1)
    assert ours.shape == ref.shape == (3, 5, 6 * up, 6 * up)
    # float64, other kernels (grouped vs per-sample, transposed vs zero-insert): rounding only
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    if demodulate:  # demodulation: unit L2 norm per output channel of the effective kernel
        w = weight[None] * styles[:, None, :, None, None]
        w = w * (w.square().sum([2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        torch.testing.assert_close(w.square().sum([2, 3, 4]), torch.ones(3, 5, dtype=torch.float64))


def test_noise_enters_with_its_strength():
    G = tiny_generator()
    ws = G.mapping(_z(1))
    layer = G.synthesis.b16.conv1
    zero = {"b16.conv1": torch.zeros_like(layer.noise_const)}
    assert not torch.equal(G.synthesis(ws), G.synthesis(ws, noise=zero))
    with torch.no_grad():
        layer.noise_strength.zero_()
    assert torch.equal(G.synthesis(ws), G.synthesis(ws, noise=zero))


# -- inversion -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_vgg():
    from harness.metrics.perceptual import load_lpips_model, resolve_backbone

    r = resolve_backbone("vgg")
    if isinstance(r, str):
        pytest.skip(r)
    return load_lpips_model("vgg", r[1], "cpu")


def test_inversion_reconstructs_a_generated_image(lpips_vgg):
    from methods.stylegan2.inversion import ProjectorSettings, project

    G = tiny_generator()
    with torch.no_grad():
        w_true = G.mapping(_z(1, seed=7), truncation_psi=0.7)
        target = G.synthesis(w_true)
        start = G.synthesis(G.mapping.w_avg[None, None].repeat(1, G.num_ws, 1))
    # 30 steps (of the projector's 1000) with a pixel term: enough on the tiny generator (measured:
    # the reconstruction's MSE falls to ~6% of the start's), a few seconds on a CPU
    settings = ProjectorSettings(steps=30, w_avg_samples=500, pixel_weight=1.0, noise_regularize=0.0)
    inv = project(G, target, lpips_vgg, settings, seed=0)
    assert inv.ws.shape == (1, G.num_ws, G.w_dim) and not inv.tuned and inv.generator is G
    # one w broadcast to every layer (space w, as both official projectors)
    assert torch.equal(inv.ws, inv.ws[:, :1].expand_as(inv.ws))
    assert np.mean(inv.history[-10:]) < 0.5 * np.mean(inv.history[:10])  # the loss went down
    with torch.no_grad():
        rec = G.synthesis(inv.ws)
    err0, err = F.mse_loss(start, target).item(), F.mse_loss(rec, target).item()
    assert err < 0.15 * err0, (err, err0)  # close to the known image, far closer than the start


def test_pivotal_tuning_improves_and_leaves_the_generator_alone(lpips_vgg):
    from methods.stylegan2.inversion import ProjectorSettings, project

    G = tiny_generator()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    inv = project(G, target, lpips_vgg, ProjectorSettings(steps=2, w_avg_samples=200, tune_steps=12,
                                                          tune_lr=1e-2, tune_lpips_threshold=0.0), seed=0)
    assert inv.tuned and inv.generator is not G and len(inv.tune_history) == 12
    assert inv.tune_history[-1] < inv.tune_history[0]
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k  # tuning works on a copy


# -- rosinality's stylegan2-pytorch layout -----------------------------------------------------------
ROS_CHANNELS = {4: 32, 8: 32, 16: 16, 32: 16}


def _rosinality_state(seed=0, w_dim=32, n_map=2):
    """A random generator in rosinality's key layout and shapes (as UserControllableLT's decoder.*)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {}
    for i in range(1, n_map + 1):
        sd[f"style.{i}.weight"], sd[f"style.{i}.bias"] = r(w_dim, w_dim) / 0.01, r(w_dim) * 0.1

    def conv(name, cin, cout, k=3, rgb=False):
        sd[f"{name}.conv.weight"] = r(1, cout, cin, k, k)
        sd[f"{name}.conv.modulation.weight"] = r(cin, w_dim)
        sd[f"{name}.conv.modulation.bias"] = 1 + 0.1 * r(cin)
        if rgb:
            sd[f"{name}.bias"] = 0.1 * r(1, cout, 1, 1)
        else:
            sd[f"{name}.noise.weight"] = 0.1 * r(1)
            sd[f"{name}.activate.bias"] = 0.1 * r(cout)

    sd["input.input"] = r(1, ROS_CHANNELS[4], 4, 4)
    conv("conv1", ROS_CHANNELS[4], ROS_CHANNELS[4])
    conv("to_rgb1", ROS_CHANNELS[4], 3, k=1, rgb=True)
    sd["noises.noise_0"] = r(1, 1, 4, 4)
    for i, res in enumerate((8, 16, 32)):
        conv(f"convs.{2 * i}", ROS_CHANNELS[res // 2], ROS_CHANNELS[res])
        conv(f"convs.{2 * i + 1}", ROS_CHANNELS[res], ROS_CHANNELS[res])
        conv(f"to_rgbs.{i}", ROS_CHANNELS[res], 3, k=1, rgb=True)
        sd[f"noises.noise_{2 * i + 1}"], sd[f"noises.noise_{2 * i + 2}"] = r(1, 1, res, res), r(1, 1, res, res)
    return sd


def _rosinality_forward(sd, z, n_map=2):
    """rosinality's Generator written from its formulas, independently of ours: per-sample kernels
    scaled by 1/sqrt(fan_in) before demodulation, up-sampling as a transposed convolution then the
    blur, the skip's FIR up-sampling as a transposed depthwise convolution."""
    import math

    lrelu = lambda t: F.leaky_relu(t, 0.2) * math.sqrt(2)  # noqa: E731
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = torch.outer(k1, k1) / torch.outer(k1, k1).sum() * 4  # upsample_factor ** 2

    def fir(x, up):  # the blur after a transposed conv (pad 1, 1), or the skip's up-sampling (up)
        c = x.shape[1]
        k = blur[None, None].repeat(c, 1, 1, 1)
        if up:
            return F.conv_transpose2d(x, k, stride=2, padding=1, groups=c)
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), k.flip([2, 3]), groups=c)

    x = z * torch.rsqrt((z ** 2).mean(1, keepdim=True) + 1e-8)
    for i in range(1, n_map + 1):
        w_, b_ = sd[f"style.{i}.weight"], sd[f"style.{i}.bias"]
        x = lrelu(x @ (w_ * 0.01 / math.sqrt(w_.shape[1])).t() + b_ * 0.01)
    latent = x

    def modconv(name, inp, demod=True, up=False):
        W = sd[f"{name}.conv.weight"][0]
        mw, mb = sd[f"{name}.conv.modulation.weight"], sd[f"{name}.conv.modulation.bias"]
        style = latent @ (mw / math.sqrt(mw.shape[1])).t() + mb
        outs = []
        for b in range(inp.shape[0]):
            w = W / math.sqrt(W[0].numel()) * style[b][None, :, None, None]
            if demod:
                w = w * torch.rsqrt((w ** 2).sum([1, 2, 3], keepdim=True) + 1e-8)
            xb = inp[b:b + 1]
            if up:
                outs.append(fir(F.conv_transpose2d(xb, w.transpose(0, 1), stride=2), up=False))
            else:
                outs.append(F.conv2d(xb, w, padding=W.shape[-1] // 2))
        return torch.cat(outs)

    def styled(name, inp, noise, up=False):
        out = modconv(name, inp, up=up) + sd[f"{name}.noise.weight"] * sd[f"noises.{noise}"]
        return lrelu(out + sd[f"{name}.activate.bias"][None, :, None, None])

    out = styled("conv1", sd["input.input"].repeat(z.shape[0], 1, 1, 1), "noise_0")
    skip = modconv("to_rgb1", out, demod=False) + sd["to_rgb1.bias"]
    for i in range(3):
        out = styled(f"convs.{2 * i}", out, f"noise_{2 * i + 1}", up=True)
        out = styled(f"convs.{2 * i + 1}", out, f"noise_{2 * i + 2}")
        skip = modconv(f"to_rgbs.{i}", out, demod=False) + sd[f"to_rgbs.{i}.bias"] + fir(skip, up=True)
    return skip


@pytest.mark.parametrize("layout", ["g_ema", "usercontrollablelt"])
def test_rosinality_checkpoints_match_an_independent_forward(tmp_path, layout):
    sd = _rosinality_state()
    latent_avg = torch.randn(32, generator=torch.Generator().manual_seed(5))
    if layout == "g_ema":
        torch.save({"g_ema": sd, "latent_avg": latent_avg}, tmp_path / "g.pt")
    else:  # UserControllableLT's checkpoint: transformer under encoder.*, its generator under decoder.*
        state = {"decoder." + k: v for k, v in sd.items()}
        state["encoder.layer1.weight"] = torch.zeros(16, 3)
        torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": {"style_num": 8}}, tmp_path / "g.pt")
    G = load_generator(tmp_path / "g.pt")
    assert G.config.channels == tuple(ROS_CHANNELS.values()) and G.num_ws == 8
    assert torch.equal(G.mapping.w_avg, latent_avg)
    z = _z(2, seed=3)
    with torch.no_grad():
        ours, ref = G(z), _rosinality_forward(sd, z)
    # float32, other kernels and summation orders (and demodulation's 1e-8 after vs before the
    # 1/sqrt(fan_in) scale: ~1e-9 relative here): measured max difference 1.1e-5 on outputs up to 25
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 0.1
