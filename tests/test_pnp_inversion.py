"""PnP Inversion (methods/pnp_inversion.py): DDIM inversion, offsets that put the source branch
back on the inverted trajectory after every step ("direct inversion"), Prompt-to-Prompt editing.

Everything runs on ``backbone=tiny`` (random-weight tiny SD pipeline, 3 steps, 128 x 128: 16 x 16
latents, the attention-map sizes the P2P tests use), no network.
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

import methods.pnp_inversion as pnp  # (registers pnp_inversion; the lead adds it to methods/__init__.py)
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import inversion as inv
from methods.diffusion.attention import BatchLayout, LocalBlend
from methods.prompt_to_prompt import word_positions, _token_encoder

from .conftest import PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
CLS = METHODS.get("pnp_inversion")
STEPS = 3
FAST = {"backbone": "tiny", "num_inference_steps": STEPS, "resolution": 128}
SRC = "a red thing on a table"
# The corrected source row vs the inverted trajectory: the offsets are computed from z* in one UNet
# call and added to the step the editing batch takes from (z* + rounding), so each step carries the
# previous step's float32 rounding through the random tiny UNet, CFG 7.5 and DDIM's 1/sqrt(a_t)
# (x 14 at SD's noisiest step). Measured on this backbone: 4e-5 after the first step, <= 4.3e-4
# after three. Without the offsets (plain DDIM inversion: the random UNet is far from invertible)
# the same rows are >= 2.9 away: TOL and GAP separate the two by three orders of magnitude.
TOL = 2e-3
GAP = 1.0


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


def _sample(target=SRC, source=SRC, **meta):
    return Sample(id="s", dataset="t", source=textured(128, 128, seed=5), source_caption=source,
                  target_caption=target, meta=dict(meta))


@pytest.fixture(scope="module")
def pipe():
    m = _method()
    m.prepare()
    return m._loaded.pipeline


def _run(pipe, sample, **kw):
    m = _method(**kw)
    with torch.inference_mode():
        return m.run_edit(pipe, sample.source, sample, keep_trace=True)


# -- parameters --------------------------------------------------------------------------------------
def test_params_defaults_official_and_validation():
    d = CLS.Params()
    assert d.model == "stabilityai/stable-diffusion-2-1-base"  # PartEdit's SD 2.1
    # run_editing_p2p.py directinversion+p2p: 50 DDIM steps, guidance 7.5, cross 0.4, self 0.6,
    # AttentionRefine, LocalBlend (start 0.2, th 0.3), eq_params value 2; load_512
    assert (d.num_inference_steps, d.guidance_scale, d.resolution) == (50, 7.5, 512)
    assert (d.inversion, d.edit_kind, d.cross_replace_steps, d.self_replace_steps) == ("direct", "refine", 0.4, 0.6)
    assert (d.blend_words, d.blend_threshold, d.blend_start, d.reweight_value) == ("auto", 0.3, 0.2, 2.0)
    tiny = CLS.parse_params({"backbone": "tiny"})
    assert tiny.auto_resolved == {"num_inference_steps": 4, "resolution": 64}
    for bad, match in [
        ({"inversion": "null_text"}, "inversion"),
        ({"edit_kind": "reweight"}, "edit_kind"),
        ({"blend_words": "meta"}, "blend_words"),
        ({"cross_replace_steps": 1.5}, "cross_replace_steps"),
        ({"self_replace_steps": -0.1}, "self_replace_steps"),
        ({"blend_threshold": 1.0}, "blend_threshold"),
        ({"reweight_value": -2.0}, "reweight_value"),
        ({"resolution": 30}, "resolution"),
    ]:
        with pytest.raises(ParamError, match=match):
            CLS.parse_params(bad)


def test_yaml_mirrors_every_param():
    conf = yaml.safe_load((REPO / "conf/method/pnp_inversion.yaml").read_text())
    assert conf.pop("name") == "pnp_inversion"
    fields = {f.name: f.default for f in dataclasses.fields(CLS.Params)}
    assert conf == fields
    assert CLS.parse_params(conf) == CLS.Params()


# -- the 3 lines: the source branch on the inverted trajectory --------------------------------------
@pytest.mark.parametrize("target", [SRC, "a blue thing on a table"])
def test_source_branch_equals_the_inverted_trajectory_at_every_step(pipe, target):
    out = _run(pipe, _sample(target))
    traj, trace = out["trajectory"], out["trace"]
    assert len(traj) == STEPS + 1 and len(trace) == STEPS
    for i in range(STEPS):  # after sampling step i the source row sits at z*_{T-i-1}
        assert (trace[i] - traj[STEPS - i - 1]).abs().max().item() < TOL, i
    # without the offsets (the script's ddim+p2p) the source branch leaves the trajectory
    plain = _run(pipe, _sample(target), inversion="ddim")
    assert plain["info"]["inversion"] == "ddim"
    for i in range(STEPS):
        assert (plain["trace"][i] - traj[STEPS - i - 1]).abs().max().item() > GAP, i


def test_identical_captions_reconstruct_the_source_and_beat_plain_ddim(pipe):
    direct, plain = _run(pipe, _sample()), _run(pipe, _sample(), inversion="ddim")
    err_direct = (direct["edit"][:1] - direct["z0"]).abs().max().item()
    err_plain = (plain["edit"][:1] - plain["z0"]).abs().max().item()
    assert err_direct < TOL < GAP < err_plain
    # the decoded source branch is the source's VAE round trip: the latent's rounding (< TOL) through
    # the random tiny decoder moves < 1% of the values by more than one grey level (measured: 0.9%,
    # at most 4 levels, mean 0.13); plain DDIM's is another image (measured: mean 37 levels)
    with torch.inference_mode():
        roundtrip = inv.decode_latents(pipe, direct["z0"]).astype(int)
        diff = np.abs(inv.decode_latents(pipe, direct["edit"][:1]).astype(int) - roundtrip)
        diff_plain = np.abs(inv.decode_latents(pipe, plain["edit"][:1]).astype(int) - roundtrip)
    assert diff.mean() < 0.5 and (diff > 1).mean() < 0.02 and diff.max() <= 8
    assert diff_plain.mean() > 10
    # the offsets correct the source row only (latents[:1] + noise_loss[:1]): with identical captions
    # the uncorrected target row follows the source's attention but not its latent, while without
    # offsets both rows are one computation (same inputs, same maps)
    assert (direct["edit"][1] - direct["edit"][0]).abs().max().item() > GAP
    assert (plain["edit"][1] - plain["edit"][0]).abs().max().item() < TOL


def test_offsets_are_the_gap_between_the_trajectory_and_one_guided_step(pipe):
    m = _method()
    sched = inv.make_schedule(pipe.scheduler, STEPS)
    z0 = inv.encode_image(pipe, textured(128, 128, seed=5))
    conds = inv.encode_prompt(pipe, [SRC, "a blue thing on a table"])
    uncond = inv.encode_prompt(pipe, "")
    traj = inv.ddim_invert(pipe.unet, sched, z0, conds[:1], STEPS)
    offsets = pnp.direct_inversion_offsets(pipe.unet, sched, traj, conds, uncond, m.params.guidance_scale)
    assert len(offsets) == STEPS
    for i, t in enumerate(sched.timesteps):  # the source row's guided DDIM step, one prompt at a time
        eps = inv.predict_eps(pipe.unet, traj[STEPS - i], t, conds[:1], 7.5, uncond)
        step = inv.ddim_move(traj[STEPS - i], eps, sched.alpha(t), sched.alpha(sched.prev(t)))
        # batched (4 rows) vs one prompt: the same arithmetic up to row blocking of the kernels, x CFG
        assert (offsets[i] - (traj[STEPS - i - 1] - step)).abs().max().item() < 1e-4
        assert offsets[i].abs().max().item() > 1e-2  # real corrections, far above the comparison's tolerance
    # the random UNet is far from invertible: the noisiest step's correction is large (measured: > 2.9)
    assert offsets[0].abs().max().item() > GAP
    with pytest.raises(ValueError, match="trajectory needs 4 latents"):
        pnp.direct_inversion_offsets(pipe.unet, sched, traj[:-1], conds, uncond, 7.5)


# -- P2P settings and blend words ----------------------------------------------------------------
@pytest.mark.parametrize("meta, target, rule, words_s, words_t, reweight", [
    ({"blended_word": "thing cup"}, "a red cup on a table", "meta.blended_word", ["thing"], ["cup"], ["cup"]),
    ({"subject": "statue"}, "a statue with the uniform torso of an angel on the ground", "meta.subject",
     ["statue"], ["statue", "uniform", "torso"], ["uniform", "torso"]),
    ({}, "a blue thing on a table", "captions", ["red"], ["blue"], ["blue"]),
])
def test_blend_words_rules_and_per_caption_lookup(pipe, meta, target, rule, words_s, words_t, reweight):
    source = "a statue of an angel with wings on the ground" if "subject" in meta else SRC
    s = _sample(target, source=source, **meta)
    m = _method()
    controller, blend, info = m.build_controller(pipe.tokenizer, s, (16, 16), BatchLayout.cfg(2))
    assert (info["blend_words_rule"], info["blend_words_source"], info["blend_words_target"]) == (rule, words_s,
                                                                                                   words_t)
    assert info["reweight_words"] == reweight and info["reweight"] == {w: 2.0 for w in reweight}
    assert info["controller"] == "refine"
    assert info["cross_replace_window"] == [0, int(0.4 * (STEPS + 1))]
    assert info["self_replace_window"] == [0, int(0.6 * STEPS)]
    assert isinstance(blend, LocalBlend) and blend.start_step == int(0.2 * STEPS)
    encode = _token_encoder(pipe.tokenizer)
    pos_s, _ = word_positions(encode, source, words_s)
    pos_t, _ = word_positions(encode, target, words_t)
    # source words in the source caption only, target words in the target caption only
    assert np.flatnonzero(blend.word_alpha[0]).tolist() == pos_s and len(pos_s) >= 1
    assert np.flatnonzero(blend.word_alpha[1]).tolist() == pos_t and len(pos_t) >= len(words_t)
    if rule == "meta.subject":  # "with" is in the source caption: not a target blend word
        with_pos, _ = word_positions(encode, target, ["with"])
        assert not set(with_pos) & set(pos_t)


def test_no_blend_words_means_no_local_blend_and_no_reweighting(pipe):
    m = _method(blend_words="none")
    _, blend, info = m.build_controller(pipe.tokenizer, _sample("a blue thing on a table"), (16, 16),
                                        BatchLayout.cfg(2))
    assert blend is None and info["blend_words_rule"] == "none" and info["reweight_words"] == []
    assert "reweight" not in info
    # identical captions: no differing words, nothing to blend (the script: no blend word, no blending)
    _, blend, info = _method().build_controller(pipe.tokenizer, _sample(), (16, 16), BatchLayout.cfg(2))
    assert blend is None and info["blend_words_source"] == [] and info["blend_words_target"] == []


def test_edit_changes_the_target_and_records_the_blend(pipe):
    out = _method().edit(_sample("a blue thing on a table", blended_word="red blue"), 0)
    assert out.image.shape == (128, 128, 3)
    # LocalBlend reads the maps at the tiny UNet's coarsest cross-attention grid (8 x 8 of 16 x 16)
    assert out.info["blend_words_rule"] == "meta.blended_word" and out.info["blend_grid_hw"] == [8, 8]
    assert out.info["blend_words_source"] == ["red"] and out.info["blend_words_target"] == ["blue"]
    assert 0.0 < out.info["blend_mask_fraction"] <= 1.0
    same = _method().edit(_sample(), 0)  # identical captions: another image
    assert np.abs(out.image.astype(int) - same.image.astype(int)).mean() > 1.0
    assert (out.info["cross_replace_steps"], out.info["self_replace_steps"]) == (0.4, 0.6)


# -- costs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inversion, guidance, calls, rows", [
    ("direct", 7.5, 3 * STEPS, STEPS + 4 * STEPS + 4 * STEPS),  # inversion (1 row), offsets and edit (4 rows)
    ("ddim", 7.5, 2 * STEPS, STEPS + 4 * STEPS),  # no offsets
    ("direct", 1.0, 3 * STEPS, STEPS + 2 * STEPS + 2 * STEPS),  # no CFG: [source, target]
])
def test_network_counts(inversion, guidance, calls, rows):
    out = _method(inversion=inversion, guidance_scale=guidance).edit(_sample("a blue thing on a table"), 0)
    nc, nr = out.info["network_calls"], out.info["network_rows"]
    assert (nc["unet"], nr["unet"]) == (calls, rows)
    assert nc["vae_encode"] == 1 and nc["vae_decode"] == 1


# -- skips -------------------------------------------------------------------------------------------
def test_blank_caption_and_replace_word_count_are_skipped(builder, tmp_path):
    builder.add_simple("same", seed=1)
    builder.add_simple("longer", seed=2, target_caption="a big blue thing")
    builder.add_simple("blank", seed=3, source_caption="  ")
    method = {"name": "pnp_inversion", **FAST, "edit_kind": "replace"}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert_skipped(out, {"longer": "same number of words", "blank": "source_caption"})


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "pnp_inversion", "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), "stabilityai/stable-diffusion-2-1-base")


# -- the whole harness -------------------------------------------------------------------------------
def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=pnp",
            "method=pnp_inversion", "++method.backbone=tiny", "++method.num_inference_steps=2", "dataset.limit=2",
            "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "pnp" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    assert (edits.unet_calls == 3 * 2).all() and (edits.unet_rows == 2 + 4 * 2 + 4 * 2).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    words = {}
    for key in edits.edit_key:
        folder = next((tmp_path / "pnp" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        assert info["inversion"] == "direct" and info["controller"] == "refine"
        assert info["blend_words_rule"] == "captions"  # the sample set has no blend words of its own
        words[info["prompt"]] = (info["blend_words_source"], info["blend_words_target"], info["reweight_words"])
    # the sample set's first two: a removal (source words only) and a word swap
    assert words == {"an espresso cup on a red saucer on a wooden table": (["with", "silver", "spoon"], [], []),
                     "a blue espresso cup full of coffee on a red saucer": (["red"], ["blue"], ["blue"])}
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pnp" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pnp" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)


def test_a_v_prediction_model_skips_every_sample_naming_it(builder, tmp_path, monkeypatch):
    # SD 2.1 at 768 px (stabilityai/stable-diffusion-2-1) predicts v: refused when the method is
    # prepared (every sample skipped with the reason), not sample by sample
    import types

    import methods._diffusion_common as dc

    real = dc.load_pipeline

    def v_prediction(cls, spec):
        loaded = dataclasses.replace(real(cls, spec))
        config = types.SimpleNamespace(prediction_type="v_prediction")
        loaded.pipeline = types.SimpleNamespace(scheduler=types.SimpleNamespace(config=config))
        return loaded

    monkeypatch.setattr(dc, "load_pipeline", v_prediction)
    add_two_samples(builder)
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "pnp_inversion", **FAST},
                             metrics=PIXEL_L1))
    edits = assert_skipped(out, {"a": "could not be prepared", "b": "could not be prepared"})
    for reason in edits.reason:
        assert "'v_prediction' model" in reason and "stabilityai/stable-diffusion-2-1-base" in reason, reason
