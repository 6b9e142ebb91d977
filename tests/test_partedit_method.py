"""PartEdit (methods/partedit/): the three-path sampler, its controller, the adapter, the harness run.

Everything runs on the tiny random-weight SDXL backbone (methods.diffusion.tiny "sdxl") with a
random part token: no network, no real weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import methods.partedit  # noqa: F401  (registers "partedit" until methods/__init__ imports it)
from harness.cli import main
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample, SkipSample
from methods.diffusion.attention import (AttentionContext, AttentionController, AttentionStore, CaptureController,
                                         ControllerList, attention_control)
from methods.diffusion.loading import ModelSpec, load_pipeline
from methods.partedit import mask as mask_mod
from methods.partedit import sampler as smp
from methods.partedit import tokens
from methods.partedit.controller import PartEditController, partedit_layout
from methods.partedit.method import TINY_TOKEN_LABEL, PartEdit

from .conftest import PIXEL_L1, job_config, read_edits, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS = 4
SIZE = 64
ROOT = Path(__file__).resolve().parent.parent
SRC, EDIT = "a photo of a red cat", "a photo of a blue cat"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    return load_pipeline(StableDiffusionXLPipeline,
                         ModelSpec(model="", backbone="tiny", tiny_kind="sdxl", device="cpu")).pipeline


@pytest.fixture(scope="module")
def token(pipe):
    return tokens.random_part_token(int(pipe.unet.config.cross_attention_dim), 0)


def controller(pipe, **kw) -> PartEditController:
    layers = mask_mod.layer_indices(pipe.unet, "code")
    return PartEditController(partedit_layout(True), lambda maps: mask_mod.part_mask(maps, size=SIZE),
                              capture_layers=layers, **kw)


def run(pipe, cond, ctrl, *, seed: int = 1, extra: bool = False, on_step=None, real=None, guidance: float = 7.5,
        wrap=None):
    """The sampler under ``ctrl`` (or ``wrap``, a controller list holding it)."""
    with attention_control(pipe.unet, wrap if wrap is not None else ctrl):
        return smp.sample(pipe, cond, height=SIZE, width=SIZE, steps=STEPS, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed), add_extra_step=extra, on_step=on_step,
                          real=real)


# -- the localisation row's text ----------------------------------------------------------------------
def test_localisation_row_is_background_part_then_background_and_pooled_untouched(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    loc = cond.embeds[2]
    assert torch.equal(loc[0], token[0]) and torch.equal(loc[1], token[1])  # BG replaces SOT; part at index 1
    assert torch.equal(loc[2:], token[:1].expand(loc.shape[0] - 2, -1))  # BG padding (PaddingStrategy.BG)
    assert torch.equal(cond.pooled[2], cond.pooled[0]) and not torch.equal(cond.pooled[1], cond.pooled[0])
    assert not torch.equal(cond.embeds[0], cond.embeds[1])
    with pytest.raises(ValueError, match="64 wide.*2048|2048 wide"):
        smp.localisation_embeds(cond.embeds[0], torch.zeros(2, 2048))


# -- blending invariants ------------------------------------------------------------------------------
def test_all_ones_mask_is_the_unblended_edit_and_t_e_zero_too(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    plain = run(pipe, cond, controller(pipe, blend=False))
    ones_ctrl = controller(pipe, forced_mask=torch.ones(SIZE, SIZE))
    ones = run(pipe, cond, ones_ctrl)
    assert ones_ctrl.blended_steps == [1, 2, 3]  # step 0 never (the code's cur_step > start_editing_at)
    # M = 1: (1 - 1) * source + 1 * edit is the edit bit for bit, at every module and step
    assert torch.equal(ones.latents[1], plain.latents[1])
    for t_e in (0, 1):  # t_e = 1: only step 0 is below t_e, and step 0 is never blended
        c = controller(pipe, t_e=t_e)
        out = run(pipe, cond, c)
        assert c.blended_steps == [] and torch.equal(out.latents[1], plain.latents[1])
    c = controller(pipe, t_e=3)
    blended = run(pipe, cond, c)
    assert c.blended_steps == [1, 2]
    assert not torch.equal(blended.latents[1], plain.latents[1])  # the computed mask does act


def test_all_zeros_mask_gives_the_source_path(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    zero = torch.zeros(SIZE, SIZE)
    # SDXL's pooled text embedding reaches the ResNets through the time embedding, outside attention:
    # the blend cannot remove it. With the edit row's pooled embedding set to the source's, the
    # only edit/source difference is the text the cross-attention reads, which a zero mask blends
    # away at every module; with add_extra_step the first real step is blended too.
    same_pool = dataclasses.replace(cond, pooled=cond.pooled.clone())
    same_pool.pooled[1] = same_pool.pooled[0]
    c = controller(pipe, forced_mask=zero)
    out = run(pipe, same_pool, c, extra=True)
    assert c.blended_steps == [1, 2, 3, 4]  # the extra pass is controller step 0
    assert torch.equal(out.latents[1], out.latents[0])
    assert np.array_equal(out.edit, out.source)
    # the control: the same conditioning unblended edits (the text differs)
    plain = run(pipe, same_pool, controller(pipe, blend=False), extra=True)
    assert not torch.equal(plain.latents[1], plain.latents[0])
    # with the real pooled embeddings a zero mask still pulls the edit to the source
    free = run(pipe, cond, controller(pipe, blend=False), extra=True)
    pulled = run(pipe, cond, controller(pipe, forced_mask=zero), extra=True)
    d_free = (free.latents[1] - free.latents[0]).abs().mean()
    d_pulled = (pulled.latents[1] - pulled.latents[0]).abs().mean()
    # (random weights: the pooled path is strong, so only "closer" is asserted, not a ratio)
    assert d_pulled < d_free, (float(d_pulled), float(d_free))


class _Spy(AttentionController):
    """Records the queries it sees at the qkv hook (placed after the PartEdit controller)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[tuple[str, torch.Tensor, int]] = []

    def on_qkv(self, ctx: AttentionContext):
        self.queries.append((ctx.kind, ctx.query.clone(), ctx.heads))
        return None


@pytest.mark.parametrize("sharing", [True, False])
def test_query_sharing_makes_localisation_queries_the_source_ones(pipe, token, sharing):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    c = controller(pipe, query_sharing=sharing)
    spy = _Spy()
    run(pipe, cond, c, wrap=ControllerList([c, spy], layout=c.layout))
    n_layers = len(pipe.unet.attn_processors)
    assert len(spy.queries) == n_layers * STEPS
    kinds = {k for k, _, _ in spy.queries}
    assert kinds == {"self", "cross"}
    loc_equal, edit_equal = [], []
    for _, q, heads in spy.queries:
        rows = q.reshape(6, heads, *q.shape[1:])
        loc_equal += [torch.equal(rows[loc], rows[src]) for src, loc in ((0, 2), (3, 5))]  # both CFG halves
        edit_equal.append(torch.equal(rows[1], rows[0]))
    # sharing: every module of every step; without it the tied latents still give equal queries at
    # the first module of later steps, but the text (cross-attention values) soon makes them differ
    assert all(loc_equal) if sharing else not all(loc_equal)
    assert not all(edit_equal)  # the edit row keeps its own queries


def test_capture_is_the_part_token_of_the_localisation_cond_row_only(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    store = AttentionStore(kinds=("cross",), max_tokens=None, keep_steps=True)
    raw = CaptureController(store, rows="all")
    c = controller(pipe, keep_maps=True, keep_masks=True)
    # the raw capture runs first: it sees the probabilities the PartEdit controller captures (before P2P)
    run(pipe, cond, c, wrap=ControllerList([raw, c], layout=c.layout))
    assert len(c.maps_per_step) == STEPS and sorted(c.maps_per_step[0]) == list(range(8))
    names = [n for n in store.steps[0]]  # call order of the cross-attention layers in one forward
    assert len(names) == 8
    for step in (0, STEPS - 1):
        for li, name in enumerate(names):
            p = store.steps[step][name]
            heads = store.meta[name][2]
            per_row = p.reshape(6, heads, p.shape[1], p.shape[2])
            got = c.maps_per_step[step][li].reshape(-1)
            want = per_row[5, :, :, 1].sum(0)  # cond half, localisation row, token 1, summed over heads
            assert torch.equal(got, want.float())
            assert not torch.allclose(got, per_row[2, :, :, 1].sum(0))  # not the uncond localisation row
            assert not torch.allclose(got, per_row[5, :, :, 0].sum(0))  # not the background token
            assert not torch.allclose(got, per_row[3, :, :, 1].sum(0))  # not the source row
    # the mask of step s is mask.part_mask of step s's maps, and step s + 1 blends with it
    assert len(c.masks) == STEPS
    want_mask = mask_mod.part_mask([c.maps_per_step[-1][i] for i in range(8)], size=SIZE)
    assert torch.equal(c.masks[-1], want_mask)


def test_capture_restricted_to_the_layer_set(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    c = PartEditController(partedit_layout(True), lambda maps: mask_mod.part_mask(maps, size=SIZE),
                           capture_layers=[5, 6], keep_maps=True)
    run(pipe, cond, c)
    assert all(sorted(m) == [5, 6] for m in c.maps_per_step) and c.captured_layers == [5, 6]


def test_latent_tying_and_the_edit_row_starts_from_the_source(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    seen: list[int] = []

    def check(i, t, latents):
        assert torch.equal(latents[2], latents[0])
        seen.append(i)

    out = run(pipe, cond, controller(pipe), on_step=check)
    assert seen == list(range(STEPS))
    assert torch.equal(out.initial[1], out.initial[0]) and not torch.equal(out.initial[2], out.initial[0])
    # row 0's noise is what one draw of the same seed gives (plain SDXL's source for that seed)
    one = torch.randn(out.initial[:1].shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.initial[0], one[0] * 1.0)


def test_real_path_source_row_is_the_inverted_trajectory(pipe, token):
    cond = smp.encode_conditioning(pipe, SRC, EDIT, token)
    image = textured(SIZE, SIZE, 4)
    real = smp.invert_real(pipe, pipe.vae, image, cond, steps=STEPS, guidance_scale=3.5, eta=1.0,
                           generator=torch.Generator().manual_seed(2))
    seen = []

    def check(i, t, latents):
        want = real.xts[i + 1] if i + 1 < STEPS else real.x0
        assert torch.equal(latents[0], want[0]) and torch.equal(latents[2], latents[0])
        seen.append(int(t))

    out = run(pipe, cond, controller(pipe), real=real, guidance=12.5, on_step=check)
    assert seen == list(real.schedule.timesteps) and torch.equal(out.initial[1], real.xts[0][0])


# -- P2P ---------------------------------------------------------------------------------------------
def test_p2p_alphas_and_mappers_follow_create_controller(pipe):
    m = PartEdit(PartEdit.parse_params({"backbone": "tiny", "num_inference_steps": 4}))
    p2p, info = m.build_p2p(pipe.tokenizer, SRC, EDIT, ["blue"], (8, 8))
    alpha = p2p.token_alpha
    pos = info["p2p_edit_word_positions"]
    assert alpha.shape == (5, 2, 77) and pos  # steps + 1 rows (get_time_words_attention_alpha)
    others = [k for k in range(77) if k not in pos]
    assert (alpha[:, :, others] == 1).all()  # default_: 1.0 -> every step
    assert (alpha[:2, 0, pos] == 1).all() and (alpha[2:, 0, pos] == 0).all()  # int(0.4 * 5) = 2
    assert (alpha[:, 1, :] == 1).all()  # "blue" is not in the localisation (source) prompt
    assert np.array_equal(p2p.mapper[1], np.eye(77)) and not np.array_equal(p2p.mapper[0], np.eye(77))
    assert p2p.self_window == (0, 0)


# -- the adapter ------------------------------------------------------------------------------------
def tiny(**params) -> PartEdit:
    return PartEdit(PartEdit.parse_params({"backbone": "tiny", "num_inference_steps": STEPS, **params}))


def sample(sid: str = "s", meta: dict | None = None, **kw) -> Sample:
    fields = dict(source_caption=SRC, target_caption=EDIT, part="head")
    fields.update(kw)
    return Sample(id=sid, dataset="t", source=textured(48, 64, 3), meta=meta or {}, **fields)


def test_params_auto_values_and_refusals():
    real = PartEdit.Params()
    # fp16 as the code where the edit runs on CUDA; fp32 elsewhere (fp16 is refused on the CPU)
    import torch

    assert (real.num_inference_steps, real.resolution, real.mask_size) == (50, 1024, 1024)
    assert real.dtype == ("fp16" if torch.cuda.is_available() else "fp32")
    assert PartEdit.Params(device="cpu").dtype == "fp32" and PartEdit.Params(device="cuda").dtype == "fp16"
    assert (real.scheduler, real.t_e, real.omega) == ("ddim", 50, 1.5)
    assert (real.guidance_scale, real.guidance_real) == (7.5, 12.5)
    t = tiny()
    assert (t.params.resolution, t.params.mask_size, t.params.dtype) == (64, 64, "fp32")
    for bad, match in (({"scheduler": "pndm"}, "scheduler"), ({"omega": 0}, "omega"), ({"t_e": -1}, "t_e"),
                       ({"layer_set": "some"}, "layer_set"), ({"n_cross_replace_edit": 1.5}, "n_cross_replace_edit")):
        with pytest.raises(Exception, match=match):
            PartEdit.parse_params({"backbone": "tiny", **bad})


def test_yaml_mirrors_params():
    cfg = yaml.safe_load((ROOT / "conf" / "method" / "partedit.yaml").read_text())
    assert cfg.pop("name") == "partedit" and METHODS.get("partedit") is PartEdit
    fields = {f.name: f.default for f in dataclasses.fields(PartEdit.Params)}
    assert cfg == fields
    assert PartEdit.parse_params(cfg) == PartEdit.Params()


def test_prompt_rules_and_synthetic_or_real():
    m = tiny()
    bench = sample(meta={"prompt_original": "A cat at a forest", "subject": "cat", "edit": "tiger", "seed": 7,
                         "part": "partimage_quadruped_head"}, source_caption=None, target_caption=None, part=None)
    assert m.prompts(bench) == ("A cat at a forest", "A tiger at a forest")  # model.py: prompt.replace(subject, edit)
    assert m.is_synthetic(bench) and not m.is_synthetic(sample())
    assert m.part_name(bench) == "partimage_quadruped_head"
    assert m.edit_words(bench, *m.prompts(bench)) == ["tiger"]
    assert m.edit_words(sample(), SRC, EDIT) == ["blue"]
    assert tiny(source="real").is_synthetic(bench) is False
    assert not m.is_synthetic(sample(meta={"split": "real", "seed": 3}))  # the bench's real rows carry seeds too
    assert m.is_synthetic(sample(meta={"split": "synth", "seed": 3}))
    words = sample(target_caption="a photo of a blue fluffy cat")
    assert "same number of words" in m.check(words) and "'s'" in m.check(words)
    assert tiny(p2p_edit_kind="auto").check(words) is None
    assert "source prompt" in m.check(sample(source_caption=None))
    assert "part" in tiny(backbone="real").check(sample(part=None))


def test_edit_counts_one_batched_unet_call_of_six_rows_per_step():
    m = tiny()
    out = m.edit(sample(meta={"seed": 5}), 0)  # synthetic: no inversion
    calls, rows = out.info["network_calls"], out.info["network_rows"]
    assert calls["unet"] == STEPS and rows["unet"] == 6 * STEPS
    assert calls["vae_decode"] == 1 and "vae_encode" not in calls  # only the edit row is decoded
    assert out.info["source_path"] == "synthetic" and out.info["source_seed"] == 5
    assert out.info["part_token"] == TINY_TOKEN_LABEL and out.info["part_token_random"] is True
    assert out.info["blended_steps"] == [1, 2, 3] and out.info["scheduler"] == "ddim"
    assert out.image.shape == (48, 64, 3) and out.mask.shape == (48, 64) and out.mask.dtype == bool
    assert out.info["mask_area"] == pytest.approx(float(out.mask.mean()))
    assert 0 < out.info["mask_area"] < 1
    extra = tiny(add_extra_step=True).edit(sample(meta={"seed": 5}), 0).info
    assert extra["network_calls"]["unet"] == STEPS + 1 and extra["blended_steps"] == [1, 2, 3, 4]
    real = m.edit(sample(), 0).info  # real: inversion (two guidance calls per step) + editing
    assert real["network_calls"]["unet"] == 3 * STEPS and real["network_calls"]["vae_encode"] == 1
    assert real["guidance_scale"] == 12.5 and real["source_path"].startswith("real")


def test_token_file_is_loaded_and_missing_token_skips(tmp_path, token):
    folder = tmp_path / "tok"
    tokens.save_part_token(token * 2, folder / "partimage_human_head.pt")
    m = tiny(part_token=None, token_dir=str(folder))
    # a tiny backbone with a token folder and an explicit name uses the file
    named = tiny(part_token="partimage_human_head", token_dir=str(folder))
    tok, label = named.part_token(sample(), 64)
    assert torch.equal(tok, token * 2) and "partimage_human_head.pt" in label
    assert m.part_token(sample(), 64)[1] == TINY_TOKEN_LABEL  # no name: the tiny random token
    bad = folder / "broken.pt"
    bad.write_bytes(b"not a tensor")
    with pytest.raises(SkipSample, match=r"sample 's'.*broken"):
        tiny(part_token=str(bad)).part_token(sample(), 64)
    wide = folder / "wide.pt"
    tokens.save_part_token(torch.zeros(2, 2048), wide)  # an SDXL token on the tiny (64-wide) model
    with pytest.raises(SkipSample, match="wide.pt"):
        tiny(part_token=str(wide)).part_token(sample(), 64)
    status = dict(tiny(part_token="partimage_human_hair", token_dir=str(folder)).weights_status())
    (what, problem), = [(w, p) for w, p in status.items() if "partimage_human_hair" in w]
    assert problem and "Aleksandar/PartEdit-extra" in problem


def test_missing_token_gives_skipped_rows_naming_it(builder, tmp_path):
    builder.add_simple("a", seed=1, part="head")
    builder.add_simple("b", seed=2, part="head")
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1,
                     method={"name": "partedit", "backbone": "tiny", "num_inference_steps": 2,
                             "part_token": "partimage_human_head", "token_dir": str(tmp_path / "none")})
    out = run_job(cfg)
    edits = read_edits(out)
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    for sid, reason in zip(edits.sample_id, edits.reason):
        assert sid in reason and "partimage_human_head" in reason and "Aleksandar/PartEdit-extra" in reason, reason


def test_missing_weights_name_sdxl_and_the_vae(builder, tmp_path, empty_hub):
    builder.add_simple("a", seed=1, part="head")
    builder.add_simple("b", seed=2, part="head")
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1,
                     method={"name": "partedit", "device": "cpu", "dtype": "fp32"})
    edits = read_edits(run_job(cfg))
    assert (edits.status == "skipped").all()
    for reason in edits.reason:
        for needle in ("SDXL:", "stabilityai/stable-diffusion-xl-base-1.0", "VAE:", "madebyollin/sdxl-vae-fp16-fix",
                       "method.vae", "backbone=tiny"):
            assert needle in reason, (needle, reason)
    status = PartEdit(PartEdit.parse_params({})).weights_status()
    names = [w for w, _ in status]
    assert names[0] == "stabilityai/stable-diffusion-xl-base-1.0" and names[1].startswith("VAE madebyollin")
    assert all(p and "backbone=tiny" in p for _, p in status[:2])
    token_rows = status[2:]
    assert len(token_rows) == len(tokens.PART_TOKENS) and all(p for _, p in token_rows)


# -- the whole harness ----------------------------------------------------------------------------------
def test_cli_run_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=pe", "method=partedit",
            "++method.backbone=tiny", "++method.num_inference_steps=2",
            "dataset.ids=[coffee_cup_blue,chelsea_eyes_blue]", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "pe" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    assert (edits.unet_calls == 3 * 2).all()  # real photos: inversion (2 calls / step) + one 6-row call / step
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    for key in edits.edit_key:
        folder = next((tmp_path / "pe" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        assert info["part_token"] == TINY_TOKEN_LABEL and info["blended_steps"] == [1]
        assert (folder / "mask.png").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pe" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pe" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)


def test_refine_kind_runs_when_word_counts_differ():
    m = tiny(p2p_edit_kind="auto")
    s = sample(target_caption="a photo of a blue fluffy cat", meta={"seed": 1})
    assert m.check(s) is None
    info = m.edit(s, 0).info
    assert info["p2p_kind"] == "refine" and info["network_calls"]["unet"] == STEPS


@pytest.mark.parametrize("scheduler, cls", [("euler", "EulerDiscreteScheduler"),
                                            ("dpmsolver_sde", "DPMSolverMultistepScheduler")])
def test_other_schedulers_run_the_same_loop(pipe, scheduler, cls):
    sched = smp.make_scheduler(pipe.scheduler, scheduler)
    assert type(sched).__name__ == cls
    if scheduler == "dpmsolver_sde":
        assert sched.config.algorithm_type == "sde-dpmsolver++" and sched.config.solver_order == 2
    info = tiny(scheduler=scheduler, add_extra_step=True).edit(sample(meta={"seed": 2}), 0).info
    assert info["scheduler"] == scheduler and info["network_calls"]["unet"] == STEPS + 1
    assert info["blended_steps"] == [1, 2, 3, 4] and 0 < info["mask_area"] <= 1
