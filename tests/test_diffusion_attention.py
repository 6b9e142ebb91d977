"""Tests for methods.diffusion.attention (issue 4: attention capture and editing).

Everything runs on a tiny seeded random-weight UNet2DConditionModel built here
(no downloads), 16x16 latents, cross_attention_dim 32.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from methods.diffusion.attention import (
    AttentionController,
    AttentionStore,
    BatchLayout,
    BlendController,
    CaptureController,
    ControllerList,
    EditingAttnProcessor,
    InjectSelfAttentionController,
    MutualSelfAttentionController,
    ReplaceCrossAttentionController,
    attention_control,
    install,
    step_window,
)

REPO = Path(__file__).resolve().parents[1]
TOKENS = 7  # text tokens of the fake encoder states
HEADS = 2


def make_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=HEADS,  # diffusers' legacy name: number of heads
    )
    return unet.eval()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return make_unet()


def inputs(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 4, 16, 16, generator=g)
    enc = torch.randn(batch, TOKENS, 32, generator=g)
    return lat, enc


def run(unet, lat, enc, t=10):
    with torch.no_grad():
        return unet(lat, t, encoder_hidden_states=enc).sample


def with_default(unet, proc_cls):
    unet.set_attn_processor(proc_cls())
    return unet


# ---------------------------------------------------------------------------
# (i) equivalence with diffusers' processors
# ---------------------------------------------------------------------------


# Same math, maybe other kernels: the editing processor takes the explicit-probabilities path
# (baddbmm + softmax + bmm, as AttnProcessor) or SDPA (as AttnProcessor2_0) depending on the
# controller; against the other processor's path it differs by float32 rounding through the test
# UNet's 14 attention layers (outputs of magnitude ~1.3: <= 1.5e-6 measured, with AVX2 and with the
# default kernels). A controller that changed anything moves the output by >= 1e-2.
@pytest.mark.parametrize("proc_cls,atol", [(AttnProcessor, 1e-5), (AttnProcessor2_0, 1e-5)])
@pytest.mark.parametrize("controller", ["none", "noop", "capture", "blend_ones"])
def test_editing_processor_matches_default(unet, proc_cls, atol, controller):
    lat, enc = inputs(2)
    ref = run(with_default(unet, proc_cls), lat, enc)
    ctrl = {
        "none": None,
        "noop": AttentionController(),
        "capture": CaptureController(AttentionStore(max_tokens=None)),
        "blend_ones": BlendController(torch.ones(16, 16)),
    }[controller]
    with attention_control(unet, ctrl):
        out = run(unet, lat, enc)
    assert torch.allclose(out, ref, atol=atol), (out - ref).abs().max()


def test_layer_level_4d_input_group_norm_residual_rescale():
    """The VAE-style path: 4-D input, group norm, residual, output rescale."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
        rescale_output_factor=2.0, bias=True,
    ).eval()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        ref = attn(x)
        attn.set_processor(EditingAttnProcessor(CaptureController(AttentionStore()), name="mid_block.attn"))
        out = attn(x)
        attn.set_processor(EditingAttnProcessor(MutualSelfAttentionController(start_step=99)))
        fast = attn(x)  # SDPA path (no probs needed)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_cross_attention_norm_cross_and_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm").eval()
    x, e = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, -1] = -1e4  # additive mask, last token hidden
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        ref = attn(x, encoder_hidden_states=e, attention_mask=mask)
        attn.set_processor(EditingAttnProcessor(AttentionController(), name="x.attn2"))
        out = attn(x, encoder_hidden_states=e, attention_mask=mask)
        attn.set_processor(EditingAttnProcessor(BlendController(torch.ones(3, 3))))
        fast = attn(x, encoder_hidden_states=e, attention_mask=mask)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(fast, ref, atol=1e-5)


# ---------------------------------------------------------------------------
# (ii) capture shapes, normalisation, aggregation; (iii) restore
# ---------------------------------------------------------------------------


def test_capture_shapes_and_sums(unet):
    lat, enc = inputs(2)
    store = AttentionStore(max_tokens=None)
    ctrl = CaptureController(store, rows="all")
    with attention_control(unet, ctrl):
        run(unet, lat, enc)
    assert ctrl.step == 1 and store.num_steps == 1
    avg = store.average()
    assert len(avg) == len(unet.attn_processors) == 14  # 7 transformer blocks x (attn1, attn2)
    res_of = {}
    for name, m in avg.items():
        place, kind, heads = store.meta[name]
        assert heads == HEADS
        n_q = m.shape[1]
        res_of[name] = int(round(n_q**0.5))
        assert n_q in (16 * 16, 8 * 8)
        if kind == "cross":
            assert name.endswith("attn2")
            assert m.shape == (2 * HEADS, n_q, TOKENS)
        else:
            assert name.endswith("attn1")
            assert m.shape == (2 * HEADS, n_q, n_q)
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    assert {store.meta[n][0] for n in avg} == {"down", "mid", "up"}
    for res in (16, 8):
        agg = store.aggregate(res, places=("down", "mid", "up"), kind="cross", batch_index=1)
        assert agg.shape == (res, res, TOKENS)
        assert torch.allclose(agg.sum(-1), torch.ones(()), atol=1e-5)
        sagg = store.aggregate(res, places=("up",), kind="self", batch_index=0)
        assert sagg.shape == (res, res, res * res)
        assert torch.allclose(sagg.sum(-1), torch.ones(()), atol=1e-5)
    # aggregate = mean over heads and layers of the chosen row (P2P aggregate_attention)
    names = [n for n in avg if store.meta[n][1] == "cross" and avg[n].shape[1] == 64 and store.meta[n][0] == "mid"]
    manual = avg[names[0]].reshape(2, HEADS, 8, 8, TOKENS)[1].mean(0)
    assert torch.allclose(store.aggregate(8, places=("mid",), batch_index=1), manual)


def test_capture_filters_kind_place_resolution_and_cond_rows(unet):
    lat, enc = inputs(4)
    store = AttentionStore(kinds=("cross",), places=("up", "down"), max_tokens=8 * 8)
    ctrl = CaptureController(store, layout=BatchLayout.cfg(2))  # keeps the 2 cond rows
    with attention_control(unet, ctrl):
        run(unet, lat, enc)
    avg = store.average()
    # the test UNet's cross-attention layers at <= 8 x 8 tokens in the up/down blocks: down_blocks.1,
    # up_blocks.0 (2); the 16 x 16 ones and the mid block's are filtered out
    assert sorted(n.split(".attentions")[0] for n in avg) == ["down_blocks.1", "up_blocks.0", "up_blocks.0"]
    for name, m in avg.items():
        place, kind, _ = store.meta[name]
        assert kind == "cross" and place in ("up", "down") and m.shape[1] <= 64
        assert m.shape[0] == 2 * HEADS
    # the stored cond rows are the batch's rows 2 and 3
    full = AttentionStore(kinds=("cross",), max_tokens=64)
    with attention_control(unet, CaptureController(full, rows="all")):
        run(unet, lat, enc)
    for name, m in avg.items():
        assert torch.allclose(m, full.average()[name][2 * HEADS:], atol=1e-6)
    with pytest.raises(ValueError):
        store.aggregate(16)


def test_restore_puts_original_processors_back(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    before = dict(unet.attn_processors)
    restore = install(unet, AttentionController())
    assert all(isinstance(p, EditingAttnProcessor) for p in unet.attn_processors.values())
    restore()
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(RuntimeError):
        with attention_control(unet, AttentionController()):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_place_and_kind_from_names(unet):
    seen = {}

    class Spy(AttentionController):
        def on_out(self, ctx):
            seen[ctx.name] = (ctx.place, ctx.kind, ctx.layer_index, ctx.call_index)

    with attention_control(unet, Spy()):
        run(unet, *inputs(1))
    assert len(seen) == 14
    for name, (place, kind, _, _) in seen.items():
        assert name.startswith({"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}[place])
        assert kind == ("self" if name.endswith("attn1") else "cross")
    assert sorted(v[3] for v in seen.values()) == list(range(14))
    assert sorted(v[2] for v in seen.values() if v[1] == "self") == list(range(7))


# ---------------------------------------------------------------------------
# (iv) blending
# ---------------------------------------------------------------------------


def _attn_pair(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 16, 16)  # [source, edit], 4x4 token grid
    return attn, x


def test_blend_zero_mask_gives_source_one_mask_gives_edit():
    attn, x = _attn_pair()
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(AttentionController(), name="up_blocks.0.attn1"))
        plain = attn(x)
        attn.set_processor(EditingAttnProcessor(BlendController(torch.zeros(8, 8)), name="up_blocks.0.attn1"))
        zero = attn(x)
        attn.set_processor(EditingAttnProcessor(BlendController(torch.ones(8, 8)), name="up_blocks.0.attn1"))
        one = attn(x)
    assert torch.equal(zero[1], zero[0])  # mask 0: 0 * edit + 1 * source, a copy
    # the blend's processor runs the same math with other kernels (SDPA vs explicit probabilities)
    assert torch.allclose(zero[0], plain[0], atol=1e-6)
    assert torch.allclose(one, plain, atol=1e-6)
    assert float((plain[0] - plain[1]).abs().max()) > 0.1  # the two rows differ (0.43 here)


def test_blend_half_mask_is_per_token_and_respects_layout():
    attn, x = _attn_pair()
    x4 = torch.cat([x, x + 1.0])  # CFG layout [u_src, u_edit, c_src, c_edit]
    mask = torch.zeros(4, 4)
    mask[:, 2:] = 1.0  # right half edited
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(AttentionController()))
        plain = attn(x4)
        attn.set_processor(EditingAttnProcessor(BlendController(mask, layout=BatchLayout.cfg(2))))
        out = attn(x4)
    m = mask.reshape(16, 1).bool()
    for edit, src in ((1, 0), (3, 2)):
        assert torch.allclose(out[edit], torch.where(m, plain[edit], plain[src]), atol=1e-6)
        assert torch.allclose(out[src], plain[src], atol=1e-6)


def test_blend_on_unet_zero_mask_changes_edit_only(unet):
    lat, enc = inputs(2)
    plain = run(with_default(unet, AttnProcessor), lat, enc)
    with attention_control(unet, BlendController(torch.zeros(16, 16))):
        out = run(unet, lat, enc)
    assert torch.allclose(out[0], plain[0], atol=1e-5)  # source row untouched (other kernels: rounding)
    assert float((out[1] - plain[1]).abs().max()) > 1e-2  # the edit row is the source's (0.2 away)


# ---------------------------------------------------------------------------
# (v) MasaCtrl mutual self-attention
# ---------------------------------------------------------------------------


def test_mutual_self_attention_identical_inputs_change_nothing(unet):
    lat, enc = inputs(1)
    lat, enc = lat.repeat(2, 1, 1, 1), enc.repeat(2, 1, 1)
    plain = run(with_default(unet, AttnProcessor), lat, enc)
    with attention_control(unet, MutualSelfAttentionController(start_step=0, start_layer=0)):
        out = run(unet, lat, enc)
    assert torch.allclose(out, plain, atol=1e-5)


def test_mutual_self_attention_uses_source_kv_at_layer_level():
    attn, x = _attn_pair()
    store = AttentionStore(max_tokens=None)
    ctrl = ControllerList([MutualSelfAttentionController(start_step=0, start_layer=0), CaptureController(store, rows="all")])
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(ctrl, name="up_blocks.1.attentions.0.transformer_blocks.0.attn1"))
        out = attn(x)
        ctrl.step_end()
        # reference: edit queries against the source's keys and values
        q = attn.head_to_batch_dim(attn.to_q(x))
        k = attn.head_to_batch_dim(attn.to_k(x))
        v = attn.head_to_batch_dim(attn.to_v(x))
        probs_edit = torch.softmax(q[2:] @ k[:2].transpose(1, 2) * attn.scale, -1)
        ref_edit = attn.to_out[0](attn.batch_to_head_dim(torch.cat([probs_edit @ v[:2]] * 2))[1:])
        probs_src = torch.softmax(q[:2] @ k[:2].transpose(1, 2) * attn.scale, -1)
    captured = next(iter(store.average().values()))
    assert torch.allclose(captured[2:], probs_edit, atol=1e-6)
    assert torch.allclose(captured[:2], probs_src, atol=1e-6)
    assert torch.allclose(out[1:], ref_edit, atol=1e-5)


def test_mutual_self_attention_starts_at_start_step(unet):
    lat, enc = inputs(2)
    plain = run(with_default(unet, AttnProcessor), lat, enc)
    ctrl = MutualSelfAttentionController(start_step=2, start_layer=3)
    outs = []
    with attention_control(unet, ctrl):
        for _ in range(3):
            outs.append(run(unet, lat, enc))
    assert ctrl.step == 3
    assert torch.allclose(outs[0], plain, atol=1e-5) and torch.allclose(outs[1], plain, atol=1e-5)
    assert torch.allclose(outs[2][0], plain[0], atol=1e-5)  # source unchanged
    assert float((outs[2][1] - plain[1]).abs().max()) > 1e-2  # the edit row changed (0.045 here)


def test_pnp_injection_copies_source_qk():
    attn, x = _attn_pair()
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(InjectSelfAttentionController(steps=None), name="up_blocks.1.attn1"))
        out = attn(x)
        q = attn.head_to_batch_dim(attn.to_q(x))
        k = attn.head_to_batch_dim(attn.to_k(x))
        v = attn.head_to_batch_dim(attn.to_v(x))
        probs = torch.softmax(q[:2] @ k[:2].transpose(1, 2) * attn.scale, -1)
        ref = attn.to_out[0](attn.batch_to_head_dim(torch.cat([probs @ v[:2], probs @ v[2:]])))
        attn.set_processor(EditingAttnProcessor(InjectSelfAttentionController(steps=None), name="down_blocks.1.attn1"))
        untouched = attn(x)
        attn.set_processor(AttnProcessor())
        plain = attn(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(untouched, plain, atol=1e-6)


# ---------------------------------------------------------------------------
# (vi) Prompt-to-Prompt replacement
# ---------------------------------------------------------------------------


def test_replace_identity_mapping_same_prompt_reproduces_plain(unet):
    lat, _ = inputs(1)
    _, enc = inputs(1, seed=5)
    lat, enc = lat.repeat(4, 1, 1, 1), enc.repeat(4, 1, 1)  # CFG layout, same prompt twice
    plain = run(with_default(unet, AttnProcessor), lat, enc)
    ctrl = ReplaceCrossAttentionController(
        torch.eye(TOKENS), num_steps=1, cross_replace_steps=1.0, self_replace_steps=1.0,
        layout=BatchLayout.cfg(2),
    )
    with attention_control(unet, ctrl):
        out = run(unet, lat, enc)
    assert torch.allclose(out, plain, atol=1e-5)


def test_replace_cross_attention_maps_source_probs_through_mapper(unet):
    lat, enc = inputs(2)
    lat = lat[:1].repeat(2, 1, 1, 1)
    perm = torch.eye(TOKENS)[torch.tensor([0, 2, 1, 3, 4, 5, 6])]  # swap tokens 1 and 2
    store = AttentionStore(kinds=("cross",), max_tokens=None)
    ctrl = ControllerList([
        ReplaceCrossAttentionController(perm, num_steps=2, cross_replace_steps=0.5),
        CaptureController(store, rows="all", ),
    ])
    with attention_control(unet, ctrl):
        run(unet, lat, enc)
        step0 = {k: v.clone() for k, v in store.average().items()}
        store.reset()
        run(unet, lat, enc)  # step 1: outside the 0.5 window
    assert ctrl.step == 2
    step1 = store.average()
    assert len(step0) == len(step1) == 7  # every cross-attention layer of the test UNet
    for name, m in step0.items():
        m = m.reshape(2, HEADS, *m.shape[1:])
        # a permutation through einsum: each output is one product by 1.0 plus zeros, exact but for
        # the GEMM's summation order (<= 1 ulp of a probability)
        assert torch.allclose(m[1], m[0] @ perm, atol=1e-6)
    for name, m in step1.items():  # outside the window: the edit row's own maps (>= 0.2 away here)
        m = m.reshape(2, HEADS, -1, TOKENS)
        assert float((m[1] - m[0] @ perm).abs().max()) > 1e-2, name


def test_step_window():
    assert step_window(0.8, 50) == (0, 40)
    assert step_window((0.2, 0.6), 10) == (2, 6)
    assert step_window(3, None) == (0, 3)
    assert step_window((1, 4), None) == (1, 4)
    assert step_window(None, 5)[0] == 0


# ---------------------------------------------------------------------------
# (vii) step counting across a scheduler loop
# ---------------------------------------------------------------------------


class StepSpy(AttentionController):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[int] = []
        self.ended = 0

    def on_out(self, ctx):
        self.seen.append(ctx.step)

    def on_step_end(self):
        self.ended += 1


def _loop(unet, split_cfg: bool, ctrl, callback=None):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(3)
    lat, enc = inputs(1)
    enc2 = torch.cat([torch.zeros_like(enc), enc])
    with torch.no_grad():
        for t in sched.timesteps:
            if split_cfg:  # P2P LOW_RESOURCE: two UNet calls per step
                eu = unet(lat, t, encoder_hidden_states=enc2[:1]).sample
                ec = unet(lat, t, encoder_hidden_states=enc2[1:]).sample
            else:
                eu, ec = unet(torch.cat([lat] * 2), t, encoder_hidden_states=enc2).sample.chunk(2)
            lat = sched.step(eu + 7.5 * (ec - eu), t, lat).prev_sample
            if callback:
                callback()


@pytest.mark.parametrize("split_cfg", [False, True])
def test_step_counting_scheduler_loop(unet, split_cfg):
    ctrl = StepSpy(unet_calls_per_step=2 if split_cfg else 1)
    store = AttentionStore(max_tokens=None)
    cap = CaptureController(store, unet_calls_per_step=ctrl.unet_calls_per_step)
    with attention_control(unet, ControllerList([ctrl, cap], unet_calls_per_step=ctrl.unet_calls_per_step)) as lst:
        _loop(unet, split_cfg, None)
        assert lst.step == 3
    per_step = 14 * (2 if split_cfg else 1)
    assert ctrl.seen == [0] * per_step + [1] * per_step + [2] * per_step
    assert ctrl.step == 3 and ctrl.ended == 3
    assert store.num_steps == 3
    # split CFG: each layer's two calls of a step are stacked (1 row each)
    assert all(m.shape[0] == 2 * HEADS for m in store.average().values())


def test_step_counting_manual_callback(unet):
    ctrl = StepSpy(auto_step=False)
    with attention_control(unet, ctrl):
        _loop(unet, False, None, callback=ctrl.step_end)
    assert ctrl.seen == [0] * 14 + [1] * 14 + [2] * 14
    assert ctrl.step == 3
    # install resets the counters
    with attention_control(unet, ctrl):
        assert ctrl.step == 0


# ---------------------------------------------------------------------------
# (viii) import hygiene
# ---------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = (
        "import sys; import methods.diffusion.attention; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    pre = subprocess.run([sys.executable, "-c", "import sys, methods.diffusion; sys.exit('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    if pre.returncode != 0:
        pytest.skip("the methods.diffusion package itself imports torch")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_replace_token_alpha_zero_keeps_edit_and_one_replaces():
    """P2P's per-token blend: alpha 0 keeps the edit's maps, alpha 1 takes the mapped source's."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, e = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    alpha = torch.zeros(1, 1, 5)
    alpha[0, 0, 2] = 1.0  # only token 2 is replaced
    store = AttentionStore(max_tokens=None)
    ctrl = ControllerList([
        ReplaceCrossAttentionController(torch.eye(5), num_steps=1, token_alpha=alpha),
        CaptureController(store, rows="all"),
    ])
    plain_store = AttentionStore(max_tokens=None)
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(ctrl, name="up_blocks.0.attn2"))
        attn(x, encoder_hidden_states=e)
        attn.set_processor(EditingAttnProcessor(CaptureController(plain_store, rows="all"), name="up_blocks.0.attn2"))
        attn(x, encoder_hidden_states=e)
    ctrl.step_end()
    plain_store.end_step()
    got = next(iter(store.average().values())).reshape(2, 2, 9, 5)
    ref = next(iter(plain_store.average().values())).reshape(2, 2, 9, 5)
    assert torch.allclose(got[0], ref[0], atol=1e-6)
    assert torch.allclose(got[1][..., 2], ref[0][..., 2], atol=1e-6)
    keep = [0, 1, 3, 4]
    assert torch.allclose(got[1][..., keep], ref[1][..., keep], atol=1e-6)
