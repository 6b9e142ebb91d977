"""CPAM's attention mechanisms (methods/cpam/attention.py): the additive-mask attention, Preservation
Adaptation (self-attention) and Localized Extraction (cross-attention) on real diffusers attention
layers through the shared EditingAttnProcessor, against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import methods.cpam.attention as ca
from methods.diffusion.attention import AttentionController, BatchLayout, EditingAttnProcessor

SELF_NAME = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
CROSS_NAME = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
# Same math through different kernels (SDPA / float32 matmul+softmax vs the loop): rounding only.
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------------
# masked_attention
# ---------------------------------------------------------------------------


def loop_attention(q, k, v, allowed, scale):
    """Independent reference: explicit loops over batch and queries, softmax over allowed keys."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys = [j for j in range(k.shape[1]) if allowed[b, i, j]]
            if not keys:
                continue
            s = [float(q[b, i].double() @ k[b, j].double()) * scale for j in keys]
            mx = max(s)
            e = [math.exp(x - mx) for x in s]
            z = sum(e)
            for w, j in zip(e, keys):
                out[b, i] += (w / z) * v[b, j].double()
    return out


def test_masked_attention_matches_loop_and_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 2, generator=g)
    allowed = torch.rand(3, 5, 6, generator=g) > 0.4
    allowed[:, :, 0] = True  # every query keeps at least one key (SDPA gives NaN otherwise)
    scale = 0.37
    got = ca.masked_attention(q, k, v, allowed, scale)
    assert torch.allclose(got.double(), loop_attention(q, k, v, allowed, scale), atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    assert torch.allclose(got, sdpa, atol=1e-6)
    # an additive float mask gives the same as the boolean one
    additive = torch.where(allowed, 0.0, float("-inf"))
    assert torch.allclose(ca.masked_attention(q, k, v, additive, scale), got, atol=1e-7)
    # default scale 1/sqrt(d) and no mask: plain attention
    assert torch.allclose(ca.masked_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_masked_attention_fully_masked_query_is_zero_and_probs_sum_to_one():
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    allowed = torch.ones(1, 3, 4, dtype=torch.bool)
    allowed[0, 1] = False  # query 1 sees no key
    allowed[0, 2, :2] = False
    p = ca.masked_attention_probs(q, k, allowed)
    assert torch.equal(p[0, 1], torch.zeros(4))
    assert torch.allclose(p[0, [0, 2]].sum(-1), torch.ones(2), atol=1e-6)
    assert torch.equal(p[0, 2, :2], torch.zeros(2))  # exact zeros on masked keys (exp(-inf))
    out = ca.masked_attention(q, k, v, allowed)
    assert torch.equal(out[0, 1], torch.zeros(4)) and not torch.isnan(out).any()


# ---------------------------------------------------------------------------
# Preservation Adaptation
# ---------------------------------------------------------------------------


def self_layer(rows=2, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(rows, 16, 16)  # 4x4 token grid
    return attn, x


def run_layer(attn, x, ctrl, name=SELF_NAME, enc=None):
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(ctrl, name=name))
        return attn(x) if enc is None else attn(x, encoder_hidden_states=enc)


def qkv(attn, x, enc=None):
    e = x if enc is None else enc
    with torch.no_grad():
        return (attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(e)),
                attn.head_to_batch_dim(attn.to_v(e)))


def project(attn, sc):
    with torch.no_grad():
        return attn.to_out[0](attn.batch_to_head_dim(sc))


def pa(m_s, m_t, **kw):
    kw.setdefault("plain_fraction", 0.0)
    kw.setdefault("start_step", 0)
    kw.setdefault("start_layer", 0)
    return ca.PreservationAdaptation(mask_provider=ca.StaticMasks(m_s, m_t), **kw)


def pa_reference(attn, x, t, s, m_s, m_t, active, v_fg=None):
    """Eq. 1-3 query by query with the loop attention (independent of the controller)."""
    q, k, v = qkv(attn, x)
    h = attn.heads
    qt, ks, vs = q[t * h:(t + 1) * h], k[s * h:(s + 1) * h], v[s * h:(s + 1) * h]
    ms, mt = m_s.reshape(-1).bool(), m_t.reshape(-1).bool()
    n = qt.shape[1]
    bg = loop_attention(qt, ks, vs, (~ms)[None, None, :].expand(h, n, n), attn.scale)
    if active:
        fg = loop_attention(qt, ks, vs if v_fg is None else v_fg, mt[None, None, :].expand(h, n, n), attn.scale)
    else:
        fg = loop_attention(qt, k[t * h:(t + 1) * h], v[t * h:(t + 1) * h], torch.ones(h, n, n, dtype=torch.bool), attn.scale)
    w = mt.double()[None, :, None]
    return project(attn, (w * fg + (1 - w) * bg).float())[0]


def test_pa_general_masks_match_the_equations():
    attn, x = self_layer()
    m_s = torch.zeros(4, 4)
    m_s[1:3, 1:3] = 1  # object in the middle of the source
    m_t = torch.zeros(4, 4)
    m_t[1:4, 2:4] = 1  # moved / grown object in the target
    plain = run_layer(attn, x, AttentionController())
    for active in (True, False):
        ctrl = pa(m_s, m_t, start_step=0 if active else 5)
        out = run_layer(attn, x, ctrl)
        assert torch.allclose(out[1], pa_reference(attn, x, 1, 0, m_s, m_t, active), atol=ATOL)
        assert torch.allclose(out[0], plain[0], atol=ATOL)  # the source row is not touched
        assert float((out[1] - plain[1]).abs().max()) > 0.05  # and the target row is changed


def test_pa_empty_masks_give_full_mutual_attention_to_the_source():
    # M_s = 0 and M_t = 0: SC = SC_bg = Att(Q_t, K_s, V_s) with no key masked, at every step/layer
    attn, x = self_layer()
    q, k, v = qkv(attn, x)
    ref = project(attn, torch.nn.functional.scaled_dot_product_attention(q[2:], k[:2], v[:2], scale=attn.scale))[0]
    for start in (0, 100):
        out = run_layer(attn, x, pa(torch.zeros(4, 4), torch.zeros(4, 4), start_step=start))
        assert torch.allclose(out[1], ref, atol=ATOL)


def test_pa_full_target_mask_before_start_is_exactly_plain():
    # M_t = 1 everywhere and the object branch not active yet: SC = own self-attention, bit-equal
    # (the controller reuses the processor's output; 0 * SC_bg adds exact zeros), whatever M_s is
    attn, x = self_layer()
    plain = run_layer(attn, x, AttentionController())
    for m_s in (torch.zeros(4, 4), torch.ones(4, 4)):
        out = run_layer(attn, x, pa(m_s, torch.ones(4, 4), start_step=1))
        assert torch.equal(out, plain)
    # retain_object=False: the object branch is never the source's
    out = run_layer(attn, x, pa(torch.zeros(4, 4), torch.ones(4, 4), retain_object=False))
    assert torch.equal(out, plain)


def test_pa_full_target_mask_active_is_mutual_attention():
    attn, x = self_layer()
    q, k, v = qkv(attn, x)
    ref = project(attn, torch.nn.functional.scaled_dot_product_attention(q[2:], k[:2], v[:2], scale=attn.scale))[0]
    out = run_layer(attn, x, pa(torch.ones(4, 4), torch.ones(4, 4)))
    assert torch.allclose(out[1], ref, atol=ATOL)


def test_pa_identical_rows_and_empty_masks_is_plain():
    attn, x = self_layer(rows=1)
    x = x.repeat(2, 1, 1)
    plain = run_layer(attn, x, AttentionController())
    out = run_layer(attn, x, pa(torch.zeros(4, 4), torch.zeros(4, 4)))
    assert torch.allclose(out, plain, atol=ATOL)


def test_pa_cfg_layout_uses_the_same_guidance_half():
    attn, x = self_layer(rows=4)  # [u_src, u_tgt, c_src, c_tgt]
    m_s = torch.zeros(4, 4)
    m_s[0, :] = 1
    m_t = torch.zeros(4, 4)
    m_t[:, 0] = 1
    plain = run_layer(attn, x, AttentionController())
    out = run_layer(attn, x, pa(m_s, m_t, layout=BatchLayout.cfg(2)))
    assert torch.allclose(out[1], pa_reference(attn, x, 1, 0, m_s, m_t, True), atol=ATOL)
    assert torch.allclose(out[3], pa_reference(attn, x, 3, 2, m_s, m_t, True), atol=ATOL)
    assert torch.allclose(out[[0, 2]], plain[[0, 2]], atol=ATOL)


def test_pa_value_blend_uses_the_clean_rows_values():
    attn, x = self_layer(rows=3)  # branches: 0 intermediate (source), 1 target, 2 clean latent
    layout = BatchLayout((0, 1, 2), ("none",) * 3)
    m_s, m_t = torch.zeros(4, 4), torch.ones(4, 4)
    _, _, v = qkv(attn, x)
    v_fg = 0.4 * v[4:6] + 0.6 * v[0:2]
    plain = run_layer(attn, x, AttentionController())
    out = run_layer(attn, x, pa(m_s, m_t, layout=layout, value_blend=0.4, clean_branch=2))
    assert torch.allclose(out[1], pa_reference(attn, x, 1, 0, m_s, m_t, True, v_fg=v_fg), atol=ATOL)
    assert torch.allclose(out[[0, 2]], plain[[0, 2]], atol=ATOL)  # the clean row is not a target
    with pytest.raises(ValueError, match="clean_branch"):
        pa(m_s, m_t, value_blend=0.4)


def test_pa_mask_clamp_weights_eq3():
    attn, x = self_layer()
    m_s, m_t = torch.zeros(4, 4), torch.ones(4, 4)
    q, k, v = qkv(attn, x)
    mutual = project(attn, torch.nn.functional.scaled_dot_product_attention(q[2:], k[:2], v[:2], scale=attn.scale))[0]
    plain = run_layer(attn, x, AttentionController())
    out = run_layer(attn, x, pa(m_s, m_t, start_step=1, mask_clamp=(0.01, 0.99)))
    # fg = own (not active yet), bg = mutual attention (M_s = 0): 0.99 own + 0.01 mutual
    assert torch.allclose(out[1], 0.99 * plain[1] + 0.01 * mutual, atol=ATOL)


def test_pa_step_and_layer_rule():
    c = pa(torch.zeros(2, 2), torch.zeros(2, 2), start_step=3, start_layer=8)
    assert c.object_active(3, 8) and not c.object_active(2, 8) and not c.object_active(3, 7)
    strict = pa(torch.zeros(2, 2), torch.zeros(2, 2), start_step=3, start_layer=8, inclusive=False)
    assert strict.object_active(4, 9) and not strict.object_active(3, 9) and not strict.object_active(4, 8)
    # defaults are the paper's T = 3, L = 8 and 10 % plain layers
    d = ca.PreservationAdaptation(mask_provider=ca.StaticMasks(np.zeros((2, 2)), np.zeros((2, 2))))
    assert (d.start_step, d.start_layer, d.plain_fraction, d.retain_object, d.value_blend) == (3, 8, 0.1, True, None)


def test_plain_layers_are_seeded_with_the_right_fraction():
    assert ca.plain_layer_count(0.1, 16) == 2  # 1.6 rounded half up
    assert ca.plain_layer_count(0.1, 10) == 1 and ca.plain_layer_count(0.0, 16) == 0
    assert ca.plain_layer_count(0.25, 16) == 4 and ca.plain_layer_count(1.0, 16) == 16
    z = torch.zeros(2, 2)
    a = pa(z, z, plain_fraction=0.25, plain_seed=7)
    b = pa(z, z, plain_fraction=0.25, plain_seed=7)
    got = a.plain_layers(0)
    assert got == b.plain_layers(0) and len(got) == 4 and len(set(got)) == 4 and all(0 <= i < 16 for i in got)
    assert all(a.plain_layers(s) == got for s in range(5))  # "once": the same layers every step
    assert a.plain_layers_by_step == {s: got for s in range(5)}  # recorded
    draws = {pa(z, z, plain_fraction=0.25, plain_seed=s).plain_layers(0) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # per-step redraw: 4 layers every step, not the same set every step
    per = pa(z, z, plain_fraction=0.25, plain_seed=7, plain_redraw="per_step")
    sets = [per.plain_layers(s) for s in range(10)]
    assert all(len(s) == 4 for s in sets) and len(set(sets)) > 1
    # a reset gives the same draw again
    a.reset()
    assert a.plain_layers_by_step == {} and a.plain_layers(0) == got
    with pytest.raises(ValueError, match="plain_fraction"):
        ca.plain_layer_count(1.5, 16)


def test_pa_plain_layer_keeps_own_self_attention():
    attn, x = self_layer()
    plain = run_layer(attn, x, AttentionController())
    ctrl = pa(torch.zeros(4, 4), torch.zeros(4, 4), plain_fraction=1.0)  # every layer plain
    assert torch.equal(run_layer(attn, x, ctrl), plain)
    assert ctrl.plain_layers_by_step == {0: tuple(range(16))}


def test_pa_bad_masks_and_layer_count_raise():
    attn, x = self_layer()
    with pytest.raises(ValueError, match="M_t of shape"):
        run_layer(attn, x, ca.PreservationAdaptation(mask_provider=lambda s, g: (np.zeros(g), np.zeros((3, 3))),
                                                     plain_fraction=0.0))
    with pytest.raises(ValueError, match="outside"):
        run_layer(attn, x, ca.PreservationAdaptation(mask_provider=lambda s, g: (np.full(g, 2.0), np.zeros(g)),
                                                     plain_fraction=0.0))
    ctrl = pa(torch.zeros(4, 4), torch.zeros(4, 4), num_self_layers=1)
    with torch.no_grad():
        attn.set_processor(EditingAttnProcessor(ctrl, name=SELF_NAME))
        attn(x)  # layer ordinal 0
        with pytest.raises(ValueError, match="num_self_layers=1"):
            attn(x)  # ordinal 1 in the same forward (no num_layers set: ordinals keep counting)


def test_pa_ignores_cross_attention_and_le_ignores_self_attention():
    attn, x, enc = cross_layer()
    plain = run_layer(attn, x, AttentionController(), CROSS_NAME, enc)
    assert torch.equal(run_layer(attn, x, pa(torch.zeros(4, 4), torch.zeros(4, 4), layout=BatchLayout.cfg(2)),
                                 CROSS_NAME, enc), plain)
    attn, x = self_layer(rows=4)
    plain = run_layer(attn, x, AttentionController())
    le = ca.LocalizedExtraction(mask_provider=ca.StaticMasks(torch.zeros(4, 4), torch.ones(4, 4)), layout=BatchLayout.cfg(2))
    assert torch.equal(run_layer(attn, x, le), plain)


# ---------------------------------------------------------------------------
# Localized Extraction
# ---------------------------------------------------------------------------


def cross_layer(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x = torch.randn(4, 16, 16)  # [u_src, u_tgt, c_src, c_tgt], 4x4 grid
    enc = torch.randn(4, 7, 12)  # 7 text tokens; rows 0/1 the null prompt, 2 source, 3 target prompt
    enc[1] = enc[0]
    return attn, x, enc


def test_le_probabilities_split_target_and_null_keys():
    attn, x, enc = cross_layer()
    m_t = torch.zeros(4, 4)
    m_t[:, :2] = 1  # left half edited
    le = ca.LocalizedExtraction(mask_provider=ca.StaticMasks(torch.zeros(4, 4), m_t), layout=BatchLayout.cfg(2),
                                capture=True)
    run_layer(attn, x, le, CROSS_NAME, enc)
    assert len(le.captured) == 1
    name, step, row, p = le.captured[0]
    assert (name, step, row, tuple(p.shape)) == (CROSS_NAME, 0, 3, (2, 16, 14))  # 7 target + 7 null keys
    inside = m_t.reshape(-1).bool()
    assert torch.equal(p[:, inside][..., 7:], torch.zeros(2, 8, 7))  # no mass on null keys inside M_t
    assert torch.equal(p[:, ~inside][..., :7], torch.zeros(2, 8, 7))  # no mass on target keys outside
    assert torch.allclose(p[:, inside][..., :7].sum(-1), torch.ones(2, 8), atol=1e-6)
    assert torch.allclose(p[:, ~inside][..., 7:].sum(-1), torch.ones(2, 8), atol=1e-6)


def test_le_output_is_eq4_and_other_rows_unchanged():
    attn, x, enc = cross_layer()
    m_t = torch.zeros(4, 4)
    m_t[1:3, 1:4] = 1
    plain = run_layer(attn, x, AttentionController(), CROSS_NAME, enc)
    out = run_layer(attn, x, ca.LocalizedExtraction(mask_provider=ca.StaticMasks(torch.zeros(4, 4), m_t),
                                                    layout=BatchLayout.cfg(2)), CROSS_NAME, enc)
    # Eq. 4 as two attentions: the target row's queries against the target prompt and against the
    # null prompt (row 1's keys), each pixel taking the one its M_t says
    q, k, v = qkv(attn, x, enc)
    to_target = project(attn, torch.nn.functional.scaled_dot_product_attention(q[6:8], k[6:8], v[6:8], scale=attn.scale))[0]
    to_null = project(attn, torch.nn.functional.scaled_dot_product_attention(q[6:8], k[2:4], v[2:4], scale=attn.scale))[0]
    m = m_t.reshape(16, 1).bool()
    assert torch.allclose(out[3], torch.where(m, to_target, to_null), atol=ATOL)
    assert torch.allclose(out[3][m.expand(-1, 16)], plain[3][m.expand(-1, 16)], atol=ATOL)  # inside: as plain
    assert float((out[3] - plain[3]).abs().max()) > 0.05  # outside differs (prompt -> null)
    assert torch.allclose(out[:3], plain[:3], atol=ATOL)


def test_le_null_embedding_equals_uncond_row_and_missing_null_raises():
    attn, x, enc = cross_layer()
    m_t = torch.zeros(4, 4)
    m_t[0] = 1
    masks = ca.StaticMasks(torch.zeros(4, 4), m_t)
    from_row = run_layer(attn, x, ca.LocalizedExtraction(mask_provider=masks, layout=BatchLayout.cfg(2)), CROSS_NAME, enc)
    from_emb = run_layer(attn, x, ca.LocalizedExtraction(mask_provider=masks, layout=BatchLayout.cfg(2),
                                                         null_embedding=enc[1]), CROSS_NAME, enc)
    assert torch.allclose(from_row, from_emb, atol=1e-6)
    # no guidance halves and no null embedding: nowhere to take the null prompt from
    with pytest.raises(ValueError, match="no unconditional row for branch 1"):
        run_layer(attn, x[:2], ca.LocalizedExtraction(mask_provider=masks), CROSS_NAME, enc[2:])
    # with a null embedding the plain layout works: row 1 (the edit) is changed
    plain = run_layer(attn, x[:2], AttentionController(), CROSS_NAME, enc[2:])
    out = run_layer(attn, x[:2], ca.LocalizedExtraction(mask_provider=masks, null_embedding=enc[0]), CROSS_NAME, enc[2:])
    assert torch.allclose(out[0], plain[0], atol=ATOL) and float((out[1] - plain[1]).abs().max()) > 0.05


def test_le_full_mask_is_plain_and_step_window():
    attn, x, enc = cross_layer()
    plain = run_layer(attn, x, AttentionController(), CROSS_NAME, enc)
    full = ca.StaticMasks(torch.zeros(4, 4), torch.ones(4, 4))
    assert torch.allclose(run_layer(attn, x, ca.LocalizedExtraction(mask_provider=full, layout=BatchLayout.cfg(2)),
                                    CROSS_NAME, enc), plain, atol=ATOL)
    empty = ca.StaticMasks(torch.zeros(4, 4), torch.zeros(4, 4))
    late = ca.LocalizedExtraction(mask_provider=empty, layout=BatchLayout.cfg(2), start_step=1)
    assert torch.equal(run_layer(attn, x, late, CROSS_NAME, enc), plain)  # step 0 < start_step: off


def test_static_masks_resize_nearest_and_follow_a_step_schedule():
    big = np.zeros((8, 8))
    big[:4, :4] = 1
    calls = []

    def schedule(step):
        calls.append(step)
        return big if step < 2 else 1 - big

    sm = ca.StaticMasks(big, schedule)
    m_s, m_t = sm(0, (4, 4))
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1
    assert torch.equal(m_s, expected) and torch.equal(m_t, expected)
    assert torch.equal(sm(0, (2, 2))[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # another layer grid
    assert torch.equal(sm(2, (4, 4))[1], 1 - expected)
    assert torch.equal(sm(2, (8, 8))[1], torch.as_tensor(1 - big, dtype=torch.float32))
    assert calls == [0, 2]  # the schedule is asked once per step, not once per layer


# ---------------------------------------------------------------------------
# On a whole (tiny, SD1.5-shaped) UNet
# ---------------------------------------------------------------------------


def test_pa_and_le_on_the_tiny_sd15_unet():
    from methods.diffusion.attention import attention_control
    from methods.diffusion.tiny import tiny_sd15

    unet = tiny_sd15()["unet"]
    n_self = sum(1 for k in unet.attn_processors if ".attn1." in k)
    assert n_self == 7  # 2 down + 1 mid + 4 up transformer blocks
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, 4, 16, 16, generator=g).repeat(4, 1, 1, 1)
    lat[[1, 3]] += 0.5 * torch.randn(1, 4, 16, 16, generator=g)
    enc = torch.randn(4, 6, 32, generator=g)
    layout = BatchLayout.cfg(2)

    def run(ctrl):
        with torch.no_grad(), attention_control(unet, ctrl):
            return unet(lat, 10, encoder_hidden_states=enc).sample

    plain = run(AttentionController(layout=layout))
    ones, zeros = torch.ones(16, 16), torch.zeros(16, 16)
    # M_t = 1 and the object branch not started: every layer keeps its output, bit for bit
    same = run(ca.PreservationAdaptation(mask_provider=ca.StaticMasks(zeros, ones), start_step=1, start_layer=0,
                                         num_self_layers=n_self, layout=layout))
    assert torch.equal(same, plain)
    # empty masks: the target rows take the source's background at every self-attention layer
    ctrl = ca.PreservationAdaptation(mask_provider=ca.StaticMasks(zeros, zeros), num_self_layers=n_self,
                                     plain_fraction=0.3, plain_seed=1, layout=layout)
    changed = run(ctrl)
    assert len(ctrl.plain_layers_by_step[0]) == 2  # round(0.3 * 7) = 2 of the 7 ordinals
    assert torch.allclose(changed[[0, 2]], plain[[0, 2]], atol=ATOL)
    assert float((changed[[1, 3]] - plain[[1, 3]]).abs().max()) > 1e-2
    # LE with the target mask everywhere changes nothing (all queries attend to the target prompt)
    le = run(ca.LocalizedExtraction(mask_provider=ca.StaticMasks(zeros, ones), layout=layout))
    assert torch.allclose(le, plain, atol=ATOL)
    # the SD1.5 default (16 self-attention layers) would be wrong for a UNet with more: named error
    with pytest.raises(ValueError, match="num_self_layers=6"):
        run(ca.PreservationAdaptation(mask_provider=ca.StaticMasks(zeros, zeros), num_self_layers=6, layout=layout))


def test_non_square_grid_uses_the_masks_aspect():
    # 8 flattened tokens with (8, 4) masks are a 4 x 2 grid; a square-biased search would pick 2 x 4
    # (it prefers h <= w), which puts M_t's right half on other tokens
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 8, 16)
    m_t = np.zeros((8, 4))
    m_t[:, 2:] = 1  # right half
    masks = ca.StaticMasks(np.zeros((8, 4)), m_t)
    assert masks.aspect == 2.0
    out = run_layer(attn, x, ca.PreservationAdaptation(mask_provider=masks, plain_fraction=0.0, start_step=1))
    plain = run_layer(attn, x, AttentionController())
    right = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)  # column 1 of the row-major 4 x 2 grid
    assert torch.equal(out[1][right], plain[1][right])  # own self-attention where M_t = 1
    assert float((out[1][~right] - plain[1][~right]).abs().min()) > 1e-4  # the source's background elsewhere
