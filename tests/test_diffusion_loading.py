"""Tiny random-weight backbones (methods/diffusion/tiny.py) and pipeline loading (loading.py).

Everything runs offline on the CPU with tiny real-class components; nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers

from methods.diffusion import loading, tiny
from methods.diffusion.loading import (
    MissingWeights,
    ModelSpec,
    UnsupportedSetting,
    load_pipeline,
    resolve_revision,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of the cat sitting on a red chair"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def _fresh_pipeline_cache():
    loading.clear_cache()
    yield
    loading.clear_cache()


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """An empty hub cache, downloads not allowed, the hub marked offline."""
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(loading.ALLOW_DOWNLOADS_ENV, raising=False)
    return home / "hub"


def _run_sd(pipe, seed: int = 0, steps: int = 2, **kw) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=steps, generator=g, output_type="np", **kw)
    return np.asarray(out.images)


# -- tokenizer --------------------------------------------------------------------------------
def test_tiny_tokenizer_round_trips_and_covers_any_text(tmp_path):
    tok = tiny.tiny_tokenizer()
    assert isinstance(tok, transformers.CLIPTokenizer)
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # the hand-written merges are used: 'the' is one token
    assert "the</w>" in tok.convert_ids_to_tokens(ids)
    # any text (upper case, digits, punctuation, non-ASCII) tokenizes without unknown tokens
    odd = tok("Zebra #42, naïve café — OK?").input_ids
    assert tok.unk_token_id not in odd[1:-1]
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(padded.input_ids) == 77
    # the files written to a folder load with the stock class too
    tiny.write_tiny_tokenizer(tmp_path / "tok")
    again = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again(PROMPT).input_ids == ids


# -- tiny factories ---------------------------------------------------------------------------
def test_tiny_sd15_builds_real_classes_with_sd15_scheduler():
    c = tiny.tiny_sd15()
    assert isinstance(c["unet"], diffusers.UNet2DConditionModel)
    assert isinstance(c["vae"], diffusers.AutoencoderKL)
    assert isinstance(c["text_encoder"], transformers.CLIPTextModel)
    assert isinstance(c["scheduler"], diffusers.DDIMScheduler)
    assert c["unet"].config.in_channels == 4 and c["unet"].config.cross_attention_dim == 32
    s = c["scheduler"].config
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert (s.clip_sample, s.set_alpha_to_one, s.steps_offset) == (False, False, 1)
    # built once, handed out as independent copies with identical weights
    c2 = tiny.tiny_sd15()
    assert c2["unet"] is not c["unet"]
    for (n, a), (_, b) in zip(c["unet"].state_dict().items(), c2["unet"].state_dict().items()):
        assert torch.equal(a, b), n


def test_tiny_sd15_pipeline_runs_deterministically():
    pipe = tiny.tiny_pipeline("sd15", diffusers.StableDiffusionPipeline)
    a = _run_sd(pipe, seed=0)
    # the pipelines' default size: UNet sample size 8 x VAE factor 8 = tiny.TINY_RESOLUTION
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    b = _run_sd(pipe, seed=0)
    assert np.array_equal(a, b)  # the same computation twice (inputs, kernels, shapes): bit for bit
    assert np.abs(a - _run_sd(pipe, seed=1)).mean() > 0.05  # other noise, another image (0.18 here)
    # a second, separately assembled pipeline has the same weights: the same computation, same output
    other = tiny.tiny_pipeline("sd15", diffusers.StableDiffusionPipeline)
    assert np.array_equal(a, _run_sd(other, seed=0))
    # an explicit size works too (latent size = image size / 8 for the tiny VAE, as for SD's)
    assert _run_sd(pipe, height=48, width=64).shape == (1, 48, 64, 3)


def test_tiny_seeding_leaves_global_rng_alone():
    tiny._COMPONENTS.pop("sd15", None)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.tiny_sd15()  # builds (seeded inside fork_rng)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_ip2p_pipeline_runs_on_an_image():
    pipe = tiny.tiny_pipeline("ip2p", diffusers.StableDiffusionInstructPix2PixPipeline)
    assert pipe.unet.config.in_channels == 8
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    g = torch.Generator("cpu").manual_seed(0)
    out = pipe("make it snowy", image=img, num_inference_steps=2, generator=g, output_type="np").images
    assert np.asarray(out).shape == (1, 32, 32, 3)
    g = torch.Generator("cpu").manual_seed(0)
    again = pipe("make it snowy", image=img, num_inference_steps=2, generator=g, output_type="np").images
    assert np.array_equal(np.asarray(out), np.asarray(again))


def test_tiny_sdxl_pipeline_runs():
    pipe = tiny.tiny_pipeline("sdxl", diffusers.StableDiffusionXLPipeline)
    assert isinstance(pipe.text_encoder_2, transformers.CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    a = _run_sd(pipe, height=32, width=32)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, _run_sd(pipe, height=32, width=32))


def test_tiny_pipeline_fills_optional_parts_and_names_missing_ones():
    # DiffEdit takes an inverse scheduler, which the factory derives from the DDIM config
    pipe = tiny.tiny_pipeline("sd15", diffusers.StableDiffusionDiffEditPipeline)
    assert isinstance(pipe.inverse_scheduler, diffusers.DDIMInverseScheduler)
    assert pipe.safety_checker is None
    with pytest.raises(TypeError, match="text_encoder_2"):
        tiny.tiny_pipeline("sd15", diffusers.StableDiffusionXLPipeline)
    with pytest.raises(ValueError, match="unknown tiny backbone"):
        tiny.tiny_components("sd3")
    assert tiny.tiny_kind_for(diffusers.StableDiffusionXLImg2ImgPipeline) == "sdxl"
    assert tiny.tiny_kind_for(diffusers.StableDiffusionInstructPix2PixPipeline) == "ip2p"
    assert tiny.tiny_kind_for(diffusers.StableDiffusionImg2ImgPipeline) == "sd15"


# -- load_pipeline: tiny ------------------------------------------------------------------------
def test_load_pipeline_tiny_is_cached_and_labelled():
    spec = ModelSpec("runwayml/stable-diffusion-v1-5", backbone="tiny", device="auto")
    first = load_pipeline(diffusers.StableDiffusionPipeline, spec)
    again = load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("runwayml/stable-diffusion-v1-5", backbone="tiny"))
    assert again is first
    assert first.revision == "tiny-random-sd15" == resolve_revision(spec, diffusers.StableDiffusionPipeline)
    assert first.weights_label == tiny.RANDOM_WEIGHTS_LABEL == "RANDOM WEIGHTS (tiny backbone, smoke run)"
    assert first.random_weights and first.info()["random_weights"] is True
    assert first.info()["weights"] == tiny.RANDOM_WEIGHTS_LABEL
    assert first.device == loading.resolve_device("auto") and first.dtype == "fp32"
    # the model id does not matter for a tiny backbone; the pipeline class picks the kind
    other_id = load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny"))
    assert other_id is first
    ip2p = load_pipeline(diffusers.StableDiffusionInstructPix2PixPipeline, ModelSpec("x/y", backbone="tiny", device="cpu"))
    assert ip2p.revision == "tiny-random-ip2p" and ip2p.pipeline.unet.config.in_channels == 8
    # a different setting is a different pipeline
    sliced = load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny", attention_slicing=True))
    assert sliced is not first


def test_load_pipeline_tiny_bf16_on_cpu():
    loaded = load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny", device="cpu", dtype="bf16"))
    assert loaded.pipeline.unet.dtype == torch.bfloat16 and loaded.dtype == "bf16"
    assert _run_sd(loaded.pipeline, steps=1).shape == (1, 64, 64, 3)


# -- load_pipeline: local folder / hub cache ------------------------------------------------------
def test_load_pipeline_from_local_folder(tmp_path):
    original = tiny.tiny_pipeline("sd15", diffusers.StableDiffusionPipeline)
    folder = tmp_path / "sd-tiny"
    original.save_pretrained(folder)
    spec = ModelSpec(str(folder), device="cpu")
    loaded = load_pipeline(diffusers.StableDiffusionPipeline, spec)
    assert loaded.revision.startswith("local-") and loaded.revision == resolve_revision(spec)
    assert loaded.weights_label != tiny.RANDOM_WEIGHTS_LABEL and not loaded.random_weights
    # the same float32 weights read back and the same classes: the same computation, bit for bit
    assert np.array_equal(_run_sd(loaded.pipeline), _run_sd(original))
    assert load_pipeline(diffusers.StableDiffusionPipeline, spec) is loaded

    # editing a file changes the revision, and the next load reads the folder again
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert resolve_revision(spec) != loaded.revision
    reloaded = load_pipeline(diffusers.StableDiffusionPipeline, spec)
    assert reloaded is not loaded and reloaded.revision == resolve_revision(spec)


def test_load_pipeline_from_hub_cache_offline(tmp_path, offline_env):
    # A hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/...
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_env / "models--someone--tiny-sd"
    tiny.tiny_pipeline("sd15", diffusers.StableDiffusionPipeline).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = ModelSpec("someone/tiny-sd", device="cpu")
    assert resolve_revision(spec) == commit
    loaded = load_pipeline(diffusers.StableDiffusionPipeline, spec)
    assert loaded.revision == commit
    assert _run_sd(loaded.pipeline).shape == (1, 64, 64, 3)


def test_missing_hub_model_names_model_and_fixes(offline_env):
    spec = ModelSpec("nobody/not-cached-model", revision="v1", device="cpu")
    with pytest.raises(MissingWeights) as e:
        load_pipeline(diffusers.StableDiffusionPipeline, spec)
    msg = str(e.value)
    for needle in ("nobody/not-cached-model", "v1", "huggingface-cli download", "backbone=tiny",
                   loading.ALLOW_DOWNLOADS_ENV, "HF_HOME", str(offline_env)):
        assert needle in msg, needle
    assert isinstance(e.value, RuntimeError)  # the runner records a prepare() error as a skip
    assert resolve_revision(spec) == "uncached:nobody/not-cached-model@v1"


def test_missing_local_folder(tmp_path):
    with pytest.raises(MissingWeights, match="does not exist"):
        load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec(str(tmp_path / "absent"), device="cpu"))


def test_hub_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert loading.hub_cache_dir() == os.path.join(str(tmp_path), "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert loading.hub_cache_dir() == str(tmp_path / "c")
    assert loading.hub_cache_dir("/x") == "/x"
    monkeypatch.setenv(loading.ALLOW_DOWNLOADS_ENV, "1")
    assert loading.downloads_allowed(False)
    monkeypatch.setenv(loading.ALLOW_DOWNLOADS_ENV, "0")
    assert not loading.downloads_allowed(False) and loading.downloads_allowed(True)


# -- settings -------------------------------------------------------------------------------------
def test_fp16_on_cpu_is_refused():
    with pytest.raises(UnsupportedSetting, match="fp16.*CPU"):
        load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny", device="cpu", dtype="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cpu_offload_and_cuda_need_cuda():
    with pytest.raises(UnsupportedSetting, match="cpu_offload"):
        load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny", device="cpu", cpu_offload=True))
    with pytest.raises(UnsupportedSetting, match="CUDA is not available"):
        load_pipeline(diffusers.StableDiffusionPipeline, ModelSpec("x/y", backbone="tiny", device="cuda"))


def test_spec_validates_values():
    with pytest.raises(UnsupportedSetting, match="dtype"):
        ModelSpec("x/y", dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedSetting, match="device"):
        ModelSpec("x/y", device="tpu")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedSetting, match="backbone"):
        ModelSpec("x/y", backbone="small")  # type: ignore[arg-type]
    assert ModelSpec("org/name").is_local is False
    assert ModelSpec("/abs/folder").is_local and ModelSpec("./rel").is_local


def test_loading_module_does_not_import_torch_or_diffusers():
    code = (
        "import sys, methods.diffusion.loading, methods.diffusion.tiny\n"
        "from methods.diffusion.loading import ModelSpec, resolve_revision\n"
        "assert resolve_revision(ModelSpec('a/b', backbone='tiny')) == 'tiny-random-sd15'\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
