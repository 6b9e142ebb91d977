"""Network-evaluation counts per edit (methods.diffusion.counting): the machine-independent cost.

Every expected count below is written from the algorithm (the paper, the official script or the
diffusers pipeline code named beside it), never read off our output. Unit: a *call* is one
forward call of a network on a batch; its *rows* are the batch size (a classifier-free-guided
step on [uncond, cond] = 1 call, 2 rows). ``cost_unet_evals`` = UNet rows.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import methods  # noqa: F401  (registers the methods)
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.diffusion import counting

from .conftest import PIXEL_L1, add_two_samples, job_config, read_edits, run_tiny_job, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sample() -> Sample:
    h, w = 48, 64
    mask = np.zeros((h, w), bool)
    mask[12:36, 16:48] = True
    src = textured(h, w, 3)
    return Sample(id="s", dataset="synthetic", source=src, instruction="make it blue", source_caption="a red thing",
                  target_caption="a blue thing", mask=mask, reference=src, reference_mask=mask)


def run_counts(name: str, sample: Sample, **params) -> tuple[dict[str, int], dict[str, int]]:
    """(network_calls, network_rows) of one tiny edit of method ``name``."""
    cls = METHODS.get(name)
    method = cls(cls.parse_params({"backbone": "tiny", **params}))
    info = method.edit(sample, 0).info
    return info["network_calls"], info["network_rows"]


# -- the diffusers pipelines ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["instruct_pix2pix", "magicbrush"])
def test_instruct_pix2pix_one_batched_call_of_three_rows_per_step(name, sample):
    # pipeline_stable_diffusion_instruct_pix2pix: one UNet call per step on
    # cat([latents] * 3) = [text+image, image only, unconditional]; prompt and negative ""
    # encoded once each; the source encoded once (prepare_image_latents), the result decoded once.
    n = 3
    calls, rows = run_counts(name, sample, num_inference_steps=n)
    assert calls == {"unet": n, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}
    assert rows == {"unet": 3 * n, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}


@pytest.mark.parametrize("strength", [0.5, 0.8, 1.0])
def test_sdedit_runs_int_steps_times_strength(strength, sample):
    # img2img get_timesteps: min(int(steps * strength), steps) denoising steps, CFG batched (2 rows)
    n = 5
    k = min(int(n * strength), n)
    calls, rows = run_counts("sdedit", sample, num_inference_steps=n, strength=strength)
    assert calls == {"unet": k, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}
    assert rows == {"unet": 2 * k, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}


def test_sd_inpaint_and_paint_by_example(sample):
    n = 3
    # inpaint pipeline, strength 1: every step, CFG batched
    calls, rows = run_counts("sd_inpaint", sample, num_inference_steps=n)
    assert calls["unet"] == n and rows["unet"] == 2 * n
    assert calls["text_encoder"] == 2 and calls["vae_decode"] == 1
    # Paint-by-Example: the reference image encoded once (the unconditional branch is a learned
    # vector, no encoder call), one CFG-batched UNet call per step, no text encoder at all
    calls, rows = run_counts("paint_by_example", sample, num_inference_steps=n)
    assert calls == {"unet": n, "image_encoder": 1, "vae_encode": 1, "vae_decode": 1}
    assert rows == {"unet": 2 * n, "image_encoder": 1, "vae_encode": 1, "vae_decode": 1}


@pytest.mark.parametrize("strength", [0.99, 0.5])
def test_sdxl_inpaint_counts_both_text_encoders(strength, sample):
    # pipeline_stable_diffusion_xl_inpaint get_timesteps: min(int(steps * strength), steps) steps
    # (the model card's 0.99 runs one step less than steps), CFG batched
    n = 4
    k = min(int(n * strength), n)
    calls, rows = run_counts("sdxl_inpaint", sample, num_inference_steps=n, strength=strength)
    assert calls["unet"] == k and rows["unet"] == 2 * k
    # SDXL's encode_prompt runs each of its two text encoders on the prompt
    assert calls["text_encoder"] >= 1 and calls["text_encoder_2"] == calls["text_encoder"]


def test_diffedit_mask_inversion_and_denoising(sample):
    # generate_mask: one UNet call on cat([image_latents] * 4) of num_maps_per_mask rows each
    # (source/target x CFG); invert: int(steps * inpaint_strength) steps (get_inverse_timesteps),
    # CFG 7.5 batched; __call__: the same number of steps (get_timesteps), CFG batched. Text:
    # generate_mask encodes target and source (2 x [cond, neg]), invert and __call__ 2 each.
    # VAE: generate_mask encodes the image repeated num_maps_per_mask times, invert once.
    n, strength, maps = 5, 0.6, 3
    k = min(int(n * strength), n)
    calls, rows = run_counts("diffedit", sample, num_inference_steps=n, inpaint_strength=strength,
                             num_maps_per_mask=maps)
    assert calls == {"unet": 1 + 2 * k, "text_encoder": 8, "vae_encode": 2, "vae_decode": 1}
    assert rows == {"unet": 4 * maps + 2 * k + 2 * k, "text_encoder": 8, "vae_encode": maps + 1, "vae_decode": 1}


def test_pix2pix_zero_inversion_reference_and_guided_passes(sample):
    # pipeline_stable_diffusion_pix2pix_zero: invert() 1 UNet call per step (guidance 1; the
    # auto-correlation / KL regularisation works on the noise prediction, no UNet call), decoding
    # its result once; __call__: a first loop of 1 CFG-batched call per step (reference
    # cross-attention maps), then a second loop of 2 CFG-batched calls per step (the gradient
    # step on x_in, then the prediction with the updated x_in), decoded once.
    n = 3
    calls, rows = run_counts("pix2pix_zero", sample, num_inference_steps=n)
    assert calls["unet"] == n + n + 2 * n
    assert rows["unet"] == n + 2 * n + 2 * 2 * n
    assert calls["vae_encode"] == 1 and calls["vae_decode"] == 2


@pytest.mark.parametrize("source_prompt, remove", [("none", "none"), ("source_caption", "source_caption")])
def test_ledits_pp_inversion_and_edit(source_prompt, remove, sample):
    # LEditsPPPipelineStableDiffusion.invert: the num_inversion_steps kept steps, one unconditional
    # UNet call each, plus one conditional call when the source prompt is not empty; __call__:
    # one call per step on cat([latents] * (1 + number of editing concepts)).
    n = 3
    concepts = 1 + (remove != "none")
    per_inversion_step = 1 + (source_prompt != "none")
    calls, rows = run_counts("ledits_pp", sample, num_inference_steps=n, source_prompt_field=source_prompt,
                             remove_concept=remove)
    assert calls["unet"] == per_inversion_step * n + n
    assert rows["unet"] == per_inversion_step * n + (1 + concepts) * n


def test_blended_latent_diffusion_skips_the_blending_fraction(sample):
    # text_editing_SD2.py: for t in timesteps[int(len(timesteps) * blending_percentage):], CFG batched
    n, frac = 5, 0.4
    k = n - int(n * frac)
    calls, rows = run_counts("blended_latent_diffusion", sample, num_inference_steps=n, blending_percentage=frac)
    assert calls == {"unet": k, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}
    assert rows == {"unet": 2 * k, "text_encoder": 2, "vae_encode": 1, "vae_decode": 1}


# -- own loops: DDIM inversion + edit --------------------------------------------------------------
def test_masactrl_guided_inversion_then_two_branch_sampling(sample):
    # MasaCtrlPipeline.invert: n steps with CFG 7.5 (2 rows per step; the official code batches
    # them in 1 call, ours runs predict_eps's two calls, so calls differ and rows agree);
    # sampling: n steps of one call on [uncond src, uncond tgt, cond src, cond tgt] (4 rows).
    n = 3
    calls, rows = run_counts("masactrl", sample, num_inference_steps=n)
    assert calls["unet"] == 2 * n + n
    assert rows["unet"] == 2 * n + 4 * n
    # text: "", source and target prompts encoded in one call each (text_embeddings)
    assert calls["text_encoder"] == 3 and calls["vae_encode"] == 1 and calls["vae_decode"] == 1


@pytest.mark.parametrize("branch", ["inversion", "reconstruction"])
def test_plug_and_play_inversion_steps_plus_edit_steps(branch, sample):
    # pnp-diffusers: preprocess.py inverts without guidance (1 row per step, inversion_steps of
    # them); pnp.py denoises with one call per step on [source branch, uncond, cond] (3 rows).
    n = 3
    calls, rows = run_counts("plug_and_play", sample, num_inference_steps=n, inversion_steps=n, source_branch=branch)
    assert calls["unet"] == n + n
    assert rows["unet"] == n + 3 * n


# -- null-text inversion (Prompt-to-Prompt) ----------------------------------------------------------
def test_prompt_to_prompt_ddim_inversion_plus_edit(sample):
    # DDIM inversion with the source prompt alone (guidance 1: 1 row per step), then
    # ddim_sample_batch: one call per step on [uncond x 2 branches, source, target] (4 rows)
    n = 3
    calls, rows = run_counts("prompt_to_prompt", sample, num_inference_steps=n, inversion="ddim")
    assert calls["unet"] == n + n
    assert rows["unet"] == n + 4 * n


def test_prompt_to_prompt_null_text_counts_the_inner_steps_taken(sample):
    # null_text_w_ptp.ipynb / Mokady et al. Alg. 1: pivot DDIM inversion (n calls, guidance 1);
    # per sampling step: the conditional prediction (1), one unconditional call per inner Adam
    # step actually taken, then the guided step with the optimised embedding (2 rows; here two
    # calls, the notebook batches them); then the P2P edit (n calls of 4 rows).
    # early_stop_epsilon 1e9: the loss is always below it, so every inner loop stops after its
    # first step whatever num_inner_steps says.
    n, inner = 3, 4
    calls, rows = run_counts("prompt_to_prompt", sample, num_inference_steps=n, num_inner_steps=inner,
                             early_stop_epsilon=1e9)
    assert calls["unet"] == n + n * (1 + 1 + 2) + n
    assert rows["unet"] == n + n * (1 + 1 + 2) + 4 * n


def test_null_text_invert_without_early_stop_runs_every_inner_step(sample):
    import torch
    from diffusers import StableDiffusionPipeline

    from methods.diffusion.inversion import encode_image, encode_prompt, null_text_invert
    from methods.diffusion.loading import ModelSpec, load_pipeline

    pipe = load_pipeline(StableDiffusionPipeline, ModelSpec(model="", backbone="tiny", tiny_kind="sd15")).pipeline
    counting.watch_pipeline(pipe)
    z0 = encode_image(pipe, np.zeros((32, 32, 3), np.uint8))
    cond, uncond = encode_prompt(pipe, "a cat"), encode_prompt(pipe, "")
    n, inner = 3, 3
    for early_stop, taken in ((-1.0, inner), (1e9, 1)):  # a negative threshold is never reached
        with counting.counting() as tally:
            null_text_invert(pipe.unet, pipe.scheduler, z0, cond, uncond, n, inner_steps=inner, early_stop=early_stop)
        assert tally.calls == {"unet": n + n * (1 + taken + 2)}
        assert tally.rows == {"unet": n + n * (1 + taken + 2)}
    # outside a tally nothing is counted (and nothing fails)
    with torch.no_grad():
        pipe.unet(z0, 10, encoder_hidden_states=cond)
    assert counting.current() is None


@pytest.mark.parametrize("name, params, calls, rows", [
    # the SDXL ports run the SD formulas above on SDXL's UNet (wrapped in PooledTextUNet for P2P:
    # the wrapped UNet is what is counted); n = 4 steps
    ("blended_latent_diffusion_sdxl", {}, 4 - int(4 * 0.25), 2 * (4 - int(4 * 0.25))),
    ("ledits_pp_sdxl", {}, 4 + 4, 4 + 2 * 4),
    ("prompt_to_prompt", {"architecture": "sdxl", "inversion": "ddim"}, 4 + 4, 4 + 4 * 4),
])
def test_sdxl_ports_count_the_same_algorithm(name, params, calls, rows, sample):
    got_calls, got_rows = run_counts(name, sample, num_inference_steps=4, **params)
    assert got_calls["unet"] == calls and got_rows["unet"] == rows
    # both SDXL text encoders ran, equally often
    assert got_calls["text_encoder"] >= 1 and got_calls["text_encoder_2"] == got_calls["text_encoder"]


# -- the mechanism -------------------------------------------------------------------------------
def test_counts_reset_per_edit_and_shared_modules_count_once(sample):
    from diffusers import StableDiffusionImg2ImgPipeline

    cls = METHODS.get("sdedit")
    method = cls(cls.parse_params({"backbone": "tiny", "num_inference_steps": 4, "strength": 0.5}))
    first = method.edit(sample, 0).info["network_calls"]
    assert first["unet"] == 2
    # a second pipeline over the same modules (as adapters that re-wrap components do): watched
    # modules keep their one hook, so a call is never counted twice
    pipe = method._loaded.pipeline
    counting.watch_pipeline(StableDiffusionImg2ImgPipeline(**pipe.components))
    second = method.edit(sample, 1).info["network_calls"]
    assert second == first  # reset per edit: not 2 + 2


def test_every_diffusion_adapter_edit_counts():
    # every registered diffusion adapter (its own edit() or the base's) opens a tally
    from methods._diffusion_common import DiffusionMethod

    # Text2LIVE is no diffusion method (a per-image optimisation under CLIP losses) but counts
    # its networks (CLIP image / text towers, generator) the same way; so do the GAN drag methods
    # (StyleGAN2 generator, its mapping network, LPIPS, UserControllableLT's latent transformer)
    counted_otherwise = {"text2live", "draggan", "usercontrollablelt"}
    names = [n for n in METHODS.names() if issubclass(METHODS.get(n), DiffusionMethod)]
    # no network of their own: classical references, and edits made elsewhere (a folder, the
    # PartEdit-Bench authors' published results)
    classical = {"identity", "inpaint", "recolor", "paste", "move", "folder", "partedit_bench_results",
                 "tedbench_results"}
    assert set(names) | counted_otherwise == {
        p.stem for p in (Path(methods.__file__).parent.parent / "conf" / "method").glob("*.yaml")} - classical
    for name in [*names, *sorted(counted_otherwise)]:
        assert getattr(METHODS.get(name).edit, "counting_edit", False) is True, name


def test_every_denoiser_counts_in_the_unet_columns():
    """ZONE's MagicBrush UNet (``unet_magicbrush``) is a denoiser like IP2P's ``unet``; SAM and CLIP
    are not."""
    from harness.runner import _unet_counts

    info = {"network_calls": {"unet": 20, "unet_magicbrush": 20, "sam": 1, "vae_decode": 1},
            "network_rows": {"unet": 60, "unet_magicbrush": 60, "sam": 1, "vae_decode": 1}}
    assert _unet_counts(info) == {"unet_calls": 40.0, "unet_rows": 120.0}
    assert _unet_counts({"network_calls": {"clip_image": 3}, "network_rows": {"clip_image": 48}}) == {
        "unet_calls": 0.0, "unet_rows": 0.0}
    assert all(math.isnan(v) for v in _unet_counts({}).values())


def test_watch_module_refuses_a_non_module():
    with pytest.raises(TypeError, match="'sam' is not a torch.nn.Module"):
        counting.watch_module("sam", object())


def test_auxiliary_network_counted_under_its_name():
    import torch

    aux = torch.nn.Linear(3, 2)
    counting.watch_module("estimator_unet", aux)
    counting.watch_module("other_name", aux)  # idempotent: keeps its first name
    with counting.counting() as tally:
        aux(torch.zeros(5, 3))
        aux(input=torch.zeros(2, 3))
        with counting.counting() as inner:  # nested: the same tally
            aux(torch.zeros(1, 3))
        assert inner is tally
    assert tally.as_info() == {"network_calls": {"estimator_unet": 3}, "network_rows": {"estimator_unet": 8}}


# -- through the runner: edits.parquet, cost rows, two runs ----------------------------------------
def test_counts_land_in_the_edits_table_identically_across_runs(builder, tmp_path):
    from harness.aggregate import cost_rows

    add_two_samples(builder)
    n, strength = 4, 0.5
    method = {"name": "sdedit", "backbone": "tiny", "num_inference_steps": n, "strength": strength, "resolution": 32}
    cfg = job_config(builder.config(), tmp_path / "r1", method=method, metrics=PIXEL_L1)
    run = run_tiny_job(cfg, "sd15")
    k = int(n * strength)
    assert run.edits["unet_calls"].tolist() == [k, k]
    assert run.edits["unet_rows"].tolist() == [2 * k, 2 * k]
    for sid in ("a", "b"):
        assert run.info(sid)["network_calls"]["unet"] == k and run.info(sid)["network_rows"]["unet"] == 2 * k
    # the score tables' cost column (protocol runner): UNet rows per edit
    costs = cost_rows(read_edits(run.outcome))
    evals = costs[costs.metric == "cost_unet_evals"]
    assert sorted(evals.value.tolist()) == [2.0 * k, 2.0 * k]
    assert set(evals.protocol) == {"runner"}
    # a second run from scratch (its own cache) counts exactly the same: machine-independent
    again = run_job(job_config(builder.config(), tmp_path / "r2", method=method, metrics=PIXEL_L1))
    cols = ["sample_id", "unet_calls", "unet_rows"]
    a = read_edits(run.outcome)[cols].sort_values("sample_id").reset_index(drop=True)
    b = read_edits(again)[cols].sort_values("sample_id").reset_index(drop=True)
    assert again.computed == 2 and a.equals(b)


def test_classical_method_unet_cost_is_not_measured(builder, tmp_path):
    add_two_samples(builder)
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "identity"}, metrics=PIXEL_L1))
    edits = read_edits(out)
    # identity runs no network and does not count: NaN (not measured), never a made-up 0
    assert len(edits) == 2
    assert all(math.isnan(v) for v in edits.unet_calls) and all(math.isnan(v) for v in edits.unet_rows)
