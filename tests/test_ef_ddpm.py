"""EF-DDPM (methods/ef_ddpm.py): edit-friendly DDPM inversion with the source caption, then DDPM
sampling with the target caption from step ``skip`` with the extracted noise maps.

Everything runs on ``backbone=tiny`` (random-weight tiny SD pipeline, a few steps, 64 x 64), no
network.
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

import methods.ef_ddpm  # noqa: F401  (registers ef_ddpm; the lead adds it to methods/__init__.py)
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import inversion as inv

from .conftest import PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
CLS = METHODS.get("ef_ddpm")
STEPS = 4
FAST = {"backbone": "tiny", "num_inference_steps": STEPS, "resolution": 64}
# Inversion then sampling replay the same UNet calls on the same inputs (the inversion's corrected
# latents are what the sampler sees), so the only differences are float32 rounding of
# mean + sigma * ((x_prev - mean) / sigma) in the last step (measured: 9e-9 on latents of magnitude
# 0.13); 1e-6 leaves two orders of margin and is far below an edit or a missing noise map (>= 1e-2,
# asserted as GAP where the test needs the margin).
TOL = 1e-6
GAP = 1e-2


def _method(**kw):
    return CLS(CLS.parse_params({**FAST, **kw}))


def _sample(source="a red thing on a table", target="a red thing on a table"):
    return Sample(id="s", dataset="t", source=textured(64, 64, seed=5), source_caption=source, target_caption=target)


def _run(method, source, target, seed=3):
    """invert_and_sample on the tiny pipeline with a seeded generator."""
    if method._loaded is None:
        method.prepare()
    pipe = method._loaded.pipeline
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        return method.invert_and_sample(pipe, textured(64, 64, seed=5), source, target, g)


# -- parameters --------------------------------------------------------------------------------------
def test_params_defaults_official_and_validation():
    d = CLS.Params()
    assert d.model == "stabilityai/stable-diffusion-2-1-base"  # PartEdit's SD 2.1
    # main_run.py: --num_diffusion_steps 100, --cfg_tar 15, --cfg_src 3.5, --skip 36, --eta 1; load_512
    assert (d.num_inference_steps, d.guidance_scale, d.source_guidance_scale) == (100, 15.0, 3.5)
    assert (d.skip, d.eta) == (36, 1.0)
    assert d.resolution == 512 and d.zero_last_noise is True
    tiny = CLS.parse_params({"backbone": "tiny"})
    assert (tiny.num_inference_steps, tiny.skip, tiny.resolution) == (4, 1, 64)
    assert tiny.auto_resolved == {"num_inference_steps": 4, "skip": 1, "resolution": 64}
    assert CLS.parse_params({"backbone": "tiny", "skip": 0}).skip == 0  # an explicit value wins
    for bad, match in [
        ({"backbone": "tiny", "skip": 4}, "skip"),  # no sampling step left
        ({"skip": -1}, "skip"),
        ({"skip": 1.5}, "skip"),
        ({"eta": 0.0}, "eta"),
        ({"source_guidance_scale": -1.0}, "source_guidance_scale"),
        ({"resolution": 30}, "resolution"),
    ]:
        with pytest.raises(ParamError, match=match):
            CLS.parse_params(bad)


def test_yaml_mirrors_every_param():
    conf = yaml.safe_load((REPO / "conf/method/ef_ddpm.yaml").read_text())
    assert conf.pop("name") == "ef_ddpm"
    fields = {f.name: f.default for f in dataclasses.fields(CLS.Params)}
    assert conf == fields
    assert CLS.parse_params(conf) == CLS.Params()


# -- the edit-friendly property --------------------------------------------------------------------
@pytest.mark.parametrize("skip", [0, 2])
def test_sampling_with_the_source_caption_reconstructs_the_source_latent(skip):
    # same caption and guidance on both sides, every noise map kept: the sampler retraces the inversion
    m = _method(skip=skip, guidance_scale=3.5, zero_last_noise=False)
    out = _run(m, "a red thing on a table", "a red thing on a table")
    x0, edit = out["x0"], out["edit"]
    assert edit.shape == x0.shape == (1, 4, 8, 8)
    assert (edit - x0).abs().max().item() < TOL
    # a different target caption moves the result by far more than the tolerance
    other = _run(_method(skip=skip, guidance_scale=3.5, zero_last_noise=False), "a red thing on a table",
                 "a blue dog in the snow")["edit"]
    assert (other - x0).abs().max().item() > GAP


def test_zeroed_last_noise_is_the_only_difference_from_exact_reconstruction():
    exact = _run(_method(skip=0, guidance_scale=3.5, zero_last_noise=False), "a cat", "a cat")
    zeroed = _run(_method(skip=0, guidance_scale=3.5, zero_last_noise=True), "a cat", "a cat")
    assert torch.count_nonzero(zeroed["zs"][-1]) == 0 and torch.equal(zeroed["zs"][0], exact["zs"][0])
    m = _method()
    m.prepare()
    sched = inv.make_schedule(m._loaded.pipeline.scheduler, STEPS)
    t = sched.timesteps[-1]
    _, sigma = inv._ddpm_mean_sigma(torch.zeros(1), torch.zeros(1), sched.alpha(t), sched.alpha(sched.prev(t)), 1.0)
    # the last step without its noise: x0 - sigma_1 z_1 (the official zs[0] = 0)
    expected = exact["x0"] - sigma * exact["zs"][-1]
    assert (zeroed["edit"] - expected).abs().max().item() < TOL
    assert (zeroed["edit"] - exact["x0"]).abs().max().item() > GAP


@pytest.mark.parametrize("skip", [0, 1])
def test_target_equal_to_source_reproduces_the_source_image(skip):
    m = _method(skip=skip, guidance_scale=3.5, zero_last_noise=False)
    s = _sample()
    out = m.edit(s, 3)
    pipe = m._loaded.pipeline
    with torch.inference_mode():
        roundtrip = inv.decode_latents(pipe, inv.encode_image(pipe, s.source))
    # the same latent decoded: at most one grey level of float rounding in the decoder
    diff = np.abs(out.image.astype(int) - roundtrip.astype(int))
    assert out.image.shape == s.source.shape and diff.max() <= 1
    assert out.info["skip"] == skip and out.info["sampling_steps"] == STEPS - skip


# -- skip and costs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("skip, cfg_src, cfg_tar, calls", [
    (0, 3.5, 15.0, 2 * STEPS + 2 * STEPS),
    (1, 3.5, 15.0, 2 * STEPS + 2 * (STEPS - 1)),
    (3, 3.5, 15.0, 2 * STEPS + 2 * (STEPS - 3)),
    (2, 1.0, 1.0, STEPS + (STEPS - 2)),  # guidance 1: the conditional branch only
])
def test_unet_calls_follow_skip(skip, cfg_src, cfg_tar, calls):
    m = _method(skip=skip, source_guidance_scale=cfg_src, guidance_scale=cfg_tar)
    out = m.edit(_sample(target="a blue thing on a table"), 0)
    nc, nr = out.info["network_calls"], out.info["network_rows"]
    assert nc["unet"] == calls and nr["unet"] == calls  # one row a call (separate CFG calls)
    assert nc["vae_encode"] == 1 and nc["vae_decode"] == 1
    assert out.info["steps"] == STEPS and out.info["skip"] == skip


# -- skips -------------------------------------------------------------------------------------------
def test_blank_caption_is_skipped_naming_sample_and_field(builder, tmp_path):
    builder.add_simple("ok", seed=1)
    builder.add_simple("blank", seed=2, target_caption="   ")
    method = {"name": "ef_ddpm", **FAST}
    out = run_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL_L1))
    assert_skipped(out, {"blank": "target_caption"})


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "ef_ddpm", "num_inference_steps": 2,
                                                                  "skip": 0}, metrics=PIXEL_L1)
    assert_missing_weights(run_job(cfg), "stabilityai/stable-diffusion-2-1-base")


# -- the whole harness -------------------------------------------------------------------------------
def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=ef", "method=ef_ddpm",
            "++method.backbone=tiny", "++method.num_inference_steps=3", "dataset.limit=2", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "ef" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    # 3 inversion steps + 2 sampling steps (tiny skip 1), two CFG calls each
    assert (edits.unet_calls == 2 * 3 + 2 * 2).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    for key in edits.edit_key:
        folder = next((tmp_path / "ef" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        assert info["skip"] == 1 and info["auto_params"]["skip"] == 1 and info["source_guidance_scale"] == 3.5
        assert info["source_caption"] != info["prompt"]  # the sample set's captions differ
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "ef" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ef" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)


def test_the_edit_seed_draws_the_inversions_noise():
    m = _method()
    s = _sample(target="a blue thing on a table")
    a, b, c = m.edit(s, 0), m.edit(s, 0), m.edit(s, 1)
    assert np.array_equal(a.image, b.image)  # the same seed: the same x_t draws, the same edit
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 1.0  # another seed: other noise maps
    assert a.info["seed"] == 0 and c.info["seed"] == 1


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
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "ef_ddpm", **FAST},
                             metrics=PIXEL_L1))
    edits = assert_skipped(out, {"a": "could not be prepared", "b": "could not be prepared"})
    for reason in edits.reason:
        assert "'v_prediction' model" in reason and "stabilityai/stable-diffusion-2-1-base" in reason, reason
