"""DragonDiffusion / DiffEditor attention: the memory bank and the image-prompt branch (tiny models)."""
from __future__ import annotations

import numpy as np
import pytest

from methods.diffusion.attention import AttentionController, ControllerList

from ._dragon import tiny_sd15_latent
from .conftest import textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N = 6


@pytest.fixture(scope="module")
def tiny():
    """Tiny SD 1.5 components, a 64 x 64 image's latent, its text embedding and schedule."""
    pipe, z0, cond, _uncond, sched = tiny_sd15_latent(N)
    return pipe, z0, cond, sched


class Spy(AttentionController):
    """Records the K/V every decoder self-attention layer ends up with (after the bank)."""

    def __init__(self):
        super().__init__(auto_step=False)
        self.seen = {}

    def on_qkv(self, ctx):
        if ctx.place == "up" and ctx.kind == "self":
            self.seen[ctx.name] = (ctx.key.clone(), ctx.value.clone())
        return None


def _forward(unet, ctrl, z, t, cond):
    import torch

    from methods.dragon.attention import dragon_processors

    with torch.no_grad(), dragon_processors(unet, ctrl):
        return unet(z, t, encoder_hidden_states=cond).sample


def test_inversion_stores_every_decoder_self_attention_per_step(tiny):
    import torch

    from methods.diffusion.inversion import ddim_invert
    from methods.dragon.inversion import invert

    pipe, z0, cond, sched = tiny
    inv = invert(pipe.unet, sched, z0, cond)
    up_self = [k[: -len(".processor")] for k in pipe.unet.attn_processors
               if k.startswith("up_blocks") and k.endswith("attn1.processor")]
    assert inv.bank.steps() == list(range(N)) and inv.bank.names() == sorted(up_self)
    assert len(inv.bank) == N * len(up_self)
    # the bank is a side effect only: the trajectory is the shared layer's DDIM inversion, and the
    # processors are put back (EditingAttnProcessor's no-op path is the same SDPA kernel)
    ref = ddim_invert(pipe.unet, sched, z0, cond, N)
    assert len(inv.latents) == N + 1
    for a, b in zip(inv.latents, ref):
        assert torch.equal(a, b)
    assert not any(type(p).__name__ == "EditingAttnProcessor" for p in pipe.unet.attn_processors.values())
    # step i's K/V are those of the UNet call at timestep timesteps[i] on the inversion latent z_{N-1-i}
    i = 2
    spy = Spy()
    _forward(pipe.unet, spy, inv.latents[N - 1 - i], sched.timesteps[i], cond)
    for name, (k, v) in spy.seen.items():
        kb, vb = inv.bank.get(i, name)
        assert torch.equal(k, kb) and torch.equal(v, vb), name


def test_memory_bank_restores_the_stored_keys_and_values(tiny):
    """replace: the layer attends to exactly the stored K/V (per CFG row); concat: its own K/V
    followed by the stored ones (the later layers' own K/V follow from the earlier layers'
    changed outputs); the bank offloaded to host memory gives the same tensors."""
    import torch

    from methods.dragon.attention import MemoryBankController
    from methods.dragon.inversion import invert

    pipe, z0, cond, sched = tiny
    inv = invert(pipe.unet, sched, z0, cond)
    off = invert(pipe.unet, sched, z0, cond, offload=True)
    assert off.bank.device() == "cpu"
    z = torch.randn(2, *z0.shape[1:], generator=torch.Generator().manual_seed(0))
    t, i = sched.timesteps[3], 3
    c2 = cond.expand(2, -1, -1)
    own = Spy()
    _forward(pipe.unet, own, z, t, c2)
    for mode in ("replace", "concat"):
        bank = MemoryBankController(inv.bank, mode, latent_hw=(8, 8))
        spy = Spy()
        bank.set("use", i, True)
        _forward(pipe.unet, ControllerList([bank, spy]), z, t, c2)
        assert bank.applied == len(own.seen) > 0
        for name, (k, v) in spy.seen.items():
            kb, vb = inv.bank.get(i, name)
            ko, vo = off.bank.get(i, name)
            assert torch.equal(kb, ko) and torch.equal(vb, vo)
            heads = kb.shape[0]
            stored_k, stored_v = kb.repeat(2, 1, 1), vb.repeat(2, 1, 1)
            if mode == "replace":
                assert torch.equal(k, stored_k) and torch.equal(v, stored_v)
            else:
                n = own.seen[name][0].shape[1]
                assert k.shape[1] == 2 * n and heads * 2 == k.shape[0]
                assert torch.equal(k[:, n:], stored_k) and torch.equal(v[:, n:], stored_v)
                if name == next(iter(own.seen)):  # the first decoder layer: its own K/V unchanged
                    assert torch.equal(k[:, :n], own.seen[name][0]) and torch.equal(v[:, :n], own.seen[name][1])
    # inactive (outside its window): nothing changes
    bank = MemoryBankController(inv.bank, "replace", latent_hw=(8, 8))
    bank.set("use", i, False)
    spy = Spy()
    _forward(pipe.unet, ControllerList([bank, spy]), z, t, c2)
    assert bank.applied == 0
    for name in own.seen:
        assert torch.equal(spy.seen[name][0], own.seen[name][0])


def test_memory_bank_mix_takes_base_outside_and_reference_inside(tiny):
    import torch
    import torch.nn.functional as F

    from methods.dragon.attention import MemoryBankController, mask_tokens
    from methods.dragon.inversion import invert

    pipe, z0, cond, sched = tiny
    z_ref = z0.flip(-1)
    inv = invert(pipe.unet, sched, torch.cat([z0, z_ref]), cond)
    base = torch.zeros(1, 1, 64, 64)
    base[..., 16:48, 8:40] = 1
    ref = torch.zeros(1, 1, 64, 64)
    ref[..., 0:32, 32:64] = 1
    bank = MemoryBankController(inv.bank, "mix", latent_hw=(8, 8), base_mask=base, ref_mask=ref)
    bank.set("use", 1, True)
    spy = Spy()
    z = z0.clone()
    _forward(pipe.unet, ControllerList([bank, spy]), z, sched.timesteps[1], cond)
    assert bank.applied == len(spy.seen) > 0
    for name, (k, v) in spy.seen.items():
        kb, vb = inv.bank.get(1, name)
        h = kb.shape[0] // 2
        n = kb.shape[1]
        side = int(round(n ** 0.5))
        # the masks at the layer's grid, recomputed by hand (nearest, > 0.5)
        bg = (F.interpolate(base, size=(side, side), mode="nearest").reshape(-1) <= 0.5)
        fg = (F.interpolate(ref, size=(side, side), mode="nearest").reshape(-1) > 0.5)
        assert torch.equal(bg, ~mask_tokens(base, n, (8, 8))) and torch.equal(fg, mask_tokens(ref, n, (8, 8)))
        want_k = torch.cat([kb[:h][:, bg], kb[h:][:, fg]], dim=1)
        want_v = torch.cat([vb[:h][:, bg], vb[h:][:, fg]], dim=1)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
        assert k.shape[1] == int(bg.sum()) + int(fg.sum()) < 2 * n


# -- image prompt -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ip(tiny, tmp_path_factory):
    from methods.dragon.image_prompt import tiny_image_prompt

    pipe = tiny[0]
    return tiny_image_prompt(pipe.unet, folder=str(tmp_path_factory.mktemp("ip")))


def test_image_prompt_encoder_resampler_and_processors_from_the_checkpoint(tiny, ip, tmp_path):
    import torch
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from PIL import Image

    from methods.dragon.image_prompt import read_ip_checkpoint, tiny_ip_state

    pipe = tiny[0]
    assert isinstance(ip.projection, IPAdapterPlusImageProjection)
    assert len(ip.projection.layers) == 4 and ip.num_tokens == 8
    img = Image.fromarray(textured(64, 64, 1))
    cond, uncond = ip.encode([img])
    assert cond.shape == uncond.shape == (1, 8, pipe.unet.config.cross_attention_dim)
    assert not torch.allclose(cond, uncond)
    # uncond = the encoder on an all-zero (normalised) image, whatever the image
    cond2, uncond2 = ip.encode([Image.fromarray(textured(64, 64, 7))])
    assert torch.equal(uncond, uncond2) and not torch.allclose(cond, cond2)
    # two images (paste / appearance): tokens concatenated
    both, both_u = ip.encode([img, img])
    assert both.shape[1] == 16 and torch.equal(both[:, :8], cond) and torch.equal(both[:, 8:], cond)
    # the resampler's weights are the checkpoint's (diffusers' converter): to_kv split into to_k / to_v
    path = tmp_path / "ck.bin"
    torch.save(tiny_ip_state(pipe.unet, 32, seed=0), path)
    proj_state, ip_state = read_ip_checkpoint(str(path))
    k, v = proj_state["layers.0.0.to_kv.weight"].chunk(2)
    assert torch.equal(ip.projection.layers[0].attn.to_k.weight, k)
    assert torch.equal(ip.projection.latents, proj_state["latents"])
    procs = ip.processors(pipe.unet, 0.5)
    cross = [key for key in pipe.unet.attn_processors if key.endswith("attn2.processor")]
    assert list(procs) == cross
    # IP-Adapter's numbering: the k-th cross-attention layer has key 2k + 1
    for idx, key in enumerate(cross):
        assert torch.equal(procs[key].to_k_ip[0].weight, ip_state[f"{2 * idx + 1}.to_k_ip.weight"])
        assert procs[key].scale == [0.5]


def test_image_prompt_scale_zero_equals_the_text_only_unet(tiny, ip):
    """gamma = 0 skips the image branch: bit-identical to the UNet's own processors (the same SDPA
    text attention); gamma > 0 changes the prediction, linearly in gamma (Eq. 5)."""
    import torch
    from PIL import Image

    from methods.dragon.attention import dragon_processors, set_image_scale

    pipe, z0, cond, sched = tiny
    unet = pipe.unet
    tokens, _ = ip.encode([Image.fromarray(textured(64, 64, 1))])
    t = sched.timesteps[2]
    with torch.no_grad():
        plain = unet(z0, t, encoder_hidden_states=cond).sample
    procs = ip.processors(unet, 0.0)
    outs = {}
    with torch.no_grad(), dragon_processors(unet, None, procs):
        for s in (0.0, 0.5, 1.0):
            set_image_scale(procs, s)
            outs[s] = unet(z0, t, encoder_hidden_states=(cond, [tokens])).sample
    assert torch.equal(outs[0.0], plain)
    assert not torch.allclose(outs[0.5], plain)
    # processors restored
    with torch.no_grad():
        assert torch.equal(unet(z0, t, encoder_hidden_states=cond).sample, plain)
    # one attention layer: out(gamma) - out(0) = gamma * (out(1) - out(0)) (to_out is affine);
    # float32 rounding of the two subtractions: 1e-5 of values of order 1
    key = next(iter(procs))
    name = key[: -len(".processor")]
    layer = unet.get_submodule(name)
    x = torch.randn(1, 16, layer.to_q.in_features, generator=torch.Generator().manual_seed(0))
    proc = procs[key]
    res = {}
    with torch.no_grad():
        for s in (0.0, 0.3, 1.0):
            proc.scale = [s]
            res[s] = proc(layer, x, encoder_hidden_states=(cond, [tokens]))
    assert torch.allclose(res[0.3] - res[0.0], 0.3 * (res[1.0] - res[0.0]), atol=1e-5)


def test_missing_image_prompt_weights_are_clear_errors(tiny, ip, tmp_path, empty_hub):
    import torch

    from methods.diffusion.loading import MissingWeights
    from methods.dragon.image_prompt import load_image_prompt, read_ip_checkpoint, tiny_ip_state

    unet = tiny[0].unet
    with pytest.raises(MissingWeights, match="'method.ip_weights' is not set"):
        read_ip_checkpoint(None)
    with pytest.raises(MissingWeights, match=r"'method.ip_weights' = '.*nope.bin' does not exist"):
        load_image_prompt(unet, str(tmp_path / "nope.bin"))
    bad = tmp_path / "bad.bin"
    torch.save({"something": {}}, bad)
    with pytest.raises(ValueError, match="not an image-prompt checkpoint"):
        read_ip_checkpoint(str(bad))
    good = tmp_path / "good.bin"
    torch.save(tiny_ip_state(unet, 32), good)
    # weights present, the encoder neither in the (empty) hub cache nor a local folder
    with pytest.raises(MissingWeights, match="'method.image_encoder' = 'h94/IP-Adapter'"):
        load_image_prompt(unet, str(good))
    with pytest.raises(MissingWeights, match="'method.image_encoder'"):
        load_image_prompt(unet, str(good), encoder=str(tmp_path / "no_encoder_here"))
    # a checkpoint for another UNet (wrong widths) names the key
    state = tiny_ip_state(unet, 32)
    state["ip_adapter"]["3.to_k_ip.weight"] = torch.zeros(5, 5)
    from methods.dragon.attention import image_prompt_processors

    with pytest.raises(ValueError, match=r"'3.to_k_ip.weight' has shape \(5, 5\)"):
        image_prompt_processors(unet, state["ip_adapter"], 8)
    del state["ip_adapter"]["3.to_k_ip.weight"]
    with pytest.raises(KeyError, match="no '3.to_k_ip.weight'"):
        image_prompt_processors(unet, state["ip_adapter"], 8)


def test_local_encoder_folder_loads(tiny, ip, tmp_path):
    """A local folder holding the encoder (save_pretrained layout, with or without the
    models/image_encoder subfolder) and a local checkpoint: the real loading path."""
    import torch
    from PIL import Image

    from methods.dragon.image_prompt import load_image_prompt, tiny_ip_state

    unet = tiny[0].unet
    good = tmp_path / "ip.bin"
    torch.save(tiny_ip_state(unet, 32), good)
    ip.encoder.save_pretrained(tmp_path / "snap" / "models" / "image_encoder")
    ip.encoder.save_pretrained(tmp_path / "flat")
    img = Image.fromarray(textured(64, 64, 1))
    for folder in (tmp_path / "snap", tmp_path / "flat"):
        loaded = load_image_prompt(unet, str(good), encoder=str(folder))
        assert loaded.num_tokens == 8
        for a, b in zip(loaded.encoder.state_dict().values(), ip.encoder.state_dict().values()):
            assert torch.equal(a, b)
        # the real processor is CLIP's 224 px one; the tiny encoder takes 32 px: only check it loads
        assert loaded.processor.crop_size["height"] == 224
    assert np.isfinite(ip.encode([img])[0].numpy()).all()
