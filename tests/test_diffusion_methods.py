"""The diffusers-backed adapters (instruct_pix2pix, magicbrush, sdedit) through the whole harness.

Everything runs on ``backbone=tiny``: random-weight tiny pipelines of the real diffusers classes
(methods/diffusion/tiny.py), so no test touches the network or needs real weights.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import methods  # noqa: F401  (registers the methods)
from harness.cache import EditStore
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.report import write_report
from harness.runner import run_job
from methods._diffusion_common import RANDOM_WEIGHTS_TAG, DiffusionMethod, working_size
from methods.diffusion.tiny import RANDOM_WEIGHTS_LABEL

from ._pipeline_spy import resized_source, spy_diffusion
from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, assert_skipped, job_config, read_edits,
                       run_tiny_job, textured)

# method -> (tiny backbone kind, the sample field holding its prompt)
METHODS_UNDER_TEST = {
    "instruct_pix2pix": ("ip2p", "instruction"),
    "magicbrush": ("ip2p", "instruction"),
    "sdedit": ("sd15", "target_caption"),
}
# method -> (diffusers pipeline class, call arguments beyond prompt / image / steps / generator,
#            UNet runs per edit, UNet batch, UNet input channels)
PIPELINE_CALLS = {
    # IP2P: every step one UNet run on [text+image, image only, neither] (3 rows), 8 channels
    # (noisy latent + source latent); defaults text 7.5, image 1.5 (diffusers IP2P __call__)
    "instruct_pix2pix": ("StableDiffusionInstructPix2PixPipeline",
                         {"guidance_scale": 7.5, "image_guidance_scale": 1.5}, 2, 3, 8),
    "magicbrush": ("StableDiffusionInstructPix2PixPipeline",
                   {"guidance_scale": 7.5, "image_guidance_scale": 1.5}, 2, 3, 8),
    # img2img: int(2 steps * strength 0.8) = 1 step run, classifier-free guidance (2 rows)
    "sdedit": ("StableDiffusionImg2ImgPipeline", {"guidance_scale": 7.5, "strength": 0.8}, 1, 2, 4),
}
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
PIXEL = PIXEL_L1


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _edit_files(results: Path, keys) -> dict[str, bytes]:
    store = EditStore(results / "test" / "edits")
    return {k: (store.folder(k) / "edit.png").read_bytes() for k in keys}


def _two_samples(builder) -> None:
    add_two_samples(builder, a={"instruction": "make it blue"}, b={"instruction": "turn it green"})


# -- parameters ---------------------------------------------------------------------------------
def test_params_validate():
    ip2p = METHODS.get("instruct_pix2pix")
    assert ip2p.Params().num_inference_steps == 100 and ip2p.Params().image_guidance_scale == 1.5
    assert METHODS.get("magicbrush").Params().model == "vinesmsuic/magicbrush-jul7"
    assert METHODS.get("sdedit").Params().strength == 0.8
    for name, bad, match in [
        ("instruct_pix2pix", {"resolution": 30}, "resolution"),
        ("instruct_pix2pix", {"num_inference_steps": 0}, "num_inference_steps"),
        ("instruct_pix2pix", {"backbone": "huge"}, "backbone"),
        ("magicbrush", {"image_guidance_scale": -1.0}, "image_guidance_scale"),
        ("sdedit", {"strength": 0.0}, "strength"),
        ("sdedit", {"strength": 1.5}, "strength"),
        ("sdedit", {"dtype": "fp8"}, "dtype"),
    ]:
        with pytest.raises(ParamError, match=match):
            METHODS.get(name).parse_params(bad)


def test_working_size():
    assert working_size(48, 64, 32) == (32, 32)
    assert working_size(47, 65, None) == (40, 64)
    assert working_size(5, 3, None) == (8, 8)


# -- the whole harness, tiny backbones ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS_UNDER_TEST))
def test_tiny_edit_cached_scored_labelled_and_seeded(name, builder, tmp_path, monkeypatch):
    import diffusers

    kind, prompt_field = METHODS_UNDER_TEST[name]
    pipeline, args, unet_runs, unet_batch, channels = PIPELINE_CALLS[name]
    spy = spy_diffusion(monkeypatch, getattr(diffusers, pipeline))
    _two_samples(builder)
    method = {"name": name, **FAST}
    run = run_tiny_job(job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL), kind)
    assert (run.edits.infer_seconds > 0).all()
    for _, info in run.records.values():
        assert info["prompt_field"] == prompt_field
    whole = run.scores.query("region == 'all'").value
    assert len(whole) == 2 and (whole > 0.02).all()  # random weights repaint the image (mean L1 ~0.29)

    # What the pipeline really received, sample by sample (the cached second run called nothing).
    calls = spy.calls()
    assert len(calls) == 2 and len(spy.pipeline) == 2
    prompts = {"a": "make it blue", "b": "turn it green"} if prompt_field == "instruction" else \
        {"a": "a blue thing", "b": "a blue thing"}
    for sid, call in zip(("a", "b"), calls):  # the runner edits in manifest order
        kw = call.kwargs
        assert kw["prompt"] == prompts[sid] and kw["num_inference_steps"] == 2 and kw["output_type"] == "np"
        assert {k: kw[k] for k in args} == args
        source = np.asarray(Image.open(builder.root / "images" / f"{sid}.png"))
        assert np.array_equal(np.asarray(kw["image"]), resized_source(source, (32, 32)))  # PIL bicubic, same call
        assert call.generator_seed == 0 and call.generator_advanced  # seeded from the job and drawn from
        # the number of steps really run: one UNet forward each, on the 4 x 4 latent of 32 x 32 (the
        # tiny VAE downsamples by 8, as SD's)
        runs = [(u.batch, u.in_channels, u.latent_hw) for u in call.unet]
        assert runs == [(unet_batch, channels, (4, 4))] * unet_runs
    assert len(spy.unet) == 2 * unet_runs

    # Same seed in a fresh cache: byte-identical edit files (the same computation: same inputs,
    # weights, kernels and thread count in this process). Another seed: different edits.
    keys = list(run.edits.edit_key)
    other = run_job(job_config(builder.config(), tmp_path / "res2", method=method, metrics=PIXEL))
    assert other.computed == 2
    assert _edit_files(tmp_path / "res", keys) == _edit_files(tmp_path / "res2", keys)
    spy.clear()
    reseeded = run_job(job_config(builder.config(), tmp_path / "res3", method=method, metrics=PIXEL, seed=1))
    assert [c.generator_seed for c in spy.calls()] == [1, 1]
    new_keys = list(read_edits(reseeded).edit_key)
    assert set(new_keys).isdisjoint(keys)
    before, after = _edit_files(tmp_path / "res", keys), _edit_files(tmp_path / "res3", new_keys)
    for old_key, new_key in zip(keys, new_keys):  # every edit differs over most of the image
        a = np.asarray(Image.open(io.BytesIO(before[old_key])), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(after[new_key])), dtype=int)
        assert (np.abs(a - b).max(-1) > 2).mean() > 0.5 and np.abs(a - b).mean() > 5  # random weights: ~40 levels


# Every diffusion adapter whose default is a real hub model (the generic adapter has none).
# zone needs four weights (IP2P, MagicBrush, SAM, its classifier) and partedit three kinds (SDXL, its
# VAE, part tokens), recorded as one combined revision: test_zone_method.py's
# test_missing_real_weights_name_every_model and test_partedit_method.py's
# test_missing_weights_name_sdxl_and_the_vae check that every one is named
REAL_MODEL_ADAPTERS = sorted(n for n in METHODS.names() if issubclass(METHODS.get(n), DiffusionMethod)
                             and n not in ("diffusers_pipeline", "zone", "partedit"))


@pytest.mark.parametrize("name", REAL_MODEL_ADAPTERS)
def test_uncached_real_model_skips_every_sample(name, builder, tmp_path, empty_hub):
    ref = builder.image("images/ref.png", textured(24, 24, 9))  # every field an adapter may need
    for sid, seed in (("a", 1), ("b", 2)):  # a drag pair too (DragDiffusion, DragonDiffusion, DiffEditor)
        builder.add_simple(sid, seed=seed, reference=ref, source_points=[[20, 20]], target_points=[[28, 24]],
                           point_layout="drag")
    model = METHODS.get(name).Params().model
    # what a method needs beyond a sample's fields to reach its weights with 2 steps
    extra = {"ef_ddpm": {"skip": 1}}.get(name, {})
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": name, "num_inference_steps": 2, **extra},
                     metrics=PIXEL)
    assert_missing_weights(run_job(cfg), model)
    # the same check without loading, as `edit-harness weights` reports it
    # (the first entry: the pipeline; DiffEditor's image-prompt files follow, tests/test_dragon_methods.py)
    (what, problem), *others = METHODS.get(name)().weights_status()
    assert what == model and "not in the Hugging Face hub cache" in problem and "backbone=tiny" in problem
    assert not others or name == "diffeditor"


def test_unscored_method_has_a_report_row_naming_the_model(builder, tmp_path, empty_hub):
    _two_samples(builder)
    run_job(job_config(builder.config(), tmp_path / "res", method={"name": "sdedit"}, metrics=PIXEL))
    run_job(job_config(builder.config(), tmp_path / "res", method={"name": "identity"}, metrics=PIXEL))
    files = write_report(tmp_path / "res" / "test", tmp_path / "report")
    table = files["table.md"].read_text()
    section = table.split("## Not scored: every edit skipped or failed", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("| sdedit")]
    assert len(rows) == 1 and "| 2 | 2 | 0 |" in rows[0]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in rows[0] and "MissingWeights" in rows[0]
    assert "| identity" not in section  # scored methods are in the table above, not here
    assert "| identity" in table.split("## Not scored")[0]


def test_weights_status_tiny_and_local(tmp_path):
    cls = METHODS.get("sdedit")
    (what, problem), = cls(cls.parse_params({"backbone": "tiny"})).weights_status()
    assert problem is None and RANDOM_WEIGHTS_LABEL in what
    (what, problem), = cls(cls.parse_params({"model": str(tmp_path / "nope")})).weights_status()
    assert "local folder does not exist" in problem
    (tmp_path / "here").mkdir()
    (what, problem), = cls(cls.parse_params({"model": str(tmp_path / "here")})).weights_status()
    assert "model_index.json" in problem  # a folder, but not a diffusers pipeline folder
    (tmp_path / "here" / "model_index.json").write_text("{}")
    (what, problem), = cls(cls.parse_params({"model": str(tmp_path / "here")})).weights_status()
    assert problem is None


@pytest.mark.parametrize("name", sorted(METHODS_UNDER_TEST))
def test_sample_without_prompt_field_is_skipped(name, builder, tmp_path):
    _, field = METHODS_UNDER_TEST[name]
    builder.add_simple("ok", instruction="make it blue")
    builder.add_simple("nofield", **{field: None})
    builder.add_simple("blank", **{field: "   "})
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": name, **FAST}, metrics=PIXEL))
    assert_skipped(out, {"nofield": field, "blank": field})


def test_cli_run_with_tiny_backbone(tmp_path):
    rc = main(["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=tiny",
               "method=instruct_pix2pix", "method.backbone=tiny", "dataset.limit=2",
               "method.num_inference_steps=2", "method.resolution=32"])
    assert rc == 0
    tables = list((tmp_path / "tiny" / "jobs").glob("*/edits.parquet"))
    assert len(tables) == 1
    edits = pd.read_parquet(tables[0])
    assert len(edits) == 2 and (edits.status == "ok").all()
    assert (edits.model_revision == "tiny-random-ip2p").all()
    assert all(RANDOM_WEIGHTS_TAG in m for m in edits.method)
    scores = pd.read_parquet(tables[0].parent / "scores.parquet")
    # 2 edits x l1, l2 x all, edited, unedited (the sample set's masks leave both regions non-empty)
    assert set(scores.metric) == {"l1", "l2"} and len(scores) == 2 * 2 * 3 and scores.value.notna().all()
    assert (scores.query("metric == 'l1' and region == 'all'").value > 0.02).all()  # random weights


def test_cli_multirun_over_diffusion_methods_with_forced_overrides(tmp_path):
    # A multirun composes the default method (identity) first: its config has no 'backbone',
    # so shared diffusion overrides are written with '++' (add or override), as the README says.
    rc = main(["run", "-m", "method=sdedit,masactrl", "++method.backbone=tiny", "++method.num_inference_steps=2",
               "++method.resolution=32", "dataset.limit=1", "metrics=pixel", f"results_dir={tmp_path}",
               "progress=false", "run_name=smoke"])
    assert rc == 0
    tables = sorted((tmp_path / "smoke" / "jobs").glob("*/edits.parquet"))
    assert [t.parent.name.split("_")[0] for t in tables] == ["masactrl", "sdedit"]  # <label>-<dataset>-<hash>
    for t in tables:
        edits = pd.read_parquet(t)
        assert (edits.status == "ok").all() and (edits.model_revision == "tiny-random-sd15").all()
