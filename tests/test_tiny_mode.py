"""``backbone=tiny`` as a quick smoke run: tiny backbones shaped like the real ones (the VAE
downsamples by 8) and small defaults for the ``"auto"`` parameters, which explicit values beat.

Configs are composed by Hydra from the shipped ``conf/`` (the same files the CLI reads); the edit
runs on the tiny random-weight backbones (methods/diffusion/tiny.py), offline, on the CPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import methods  # noqa: F401  (registers the methods)
from harness.cli import CONF_DIR
from harness.registry import METHODS
from harness.runner import Job, JobConfig, build_method, run_job
from methods._diffusion_common import AUTO, DiffusionMethod, auto_names
from methods.diffusion import loading, tiny

from .conftest import PIXEL_L1, TWO_SIZES, add_two_samples, job_config, read_edits, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Every shipped config of a diffusion adapter (conf/method/*.yaml whose method is a DiffusionMethod).
DIFFUSION_CONFIGS = sorted(
    p.stem for p in CONF_DIR.joinpath("method").glob("*.yaml")
    if p.stem in METHODS and issubclass(METHODS.get(p.stem), DiffusionMethod)
)
# The generic adapter names its pipeline in YAML (required); this one is the sdedit example.
GENERIC = ["method.pipeline=diffusers.StableDiffusionImg2ImgPipeline",
           "method.inputs={image:source,prompt:target_caption}"]
# Method-specific tiny values of the "auto" parameters (beyond working size and steps), as the
# method modules declare them: what a smoke run of each must get.
TINY_EXTRA = {
    "plug_and_play": {"inversion_steps": tiny.TINY_STEPS},  # follows num_inference_steps
    "prompt_to_prompt": {"num_inner_steps": 2},
    "masactrl": {"start_step": 1, "start_layer": 3},
    "ledits_pp": {"use_intersect_mask": False},
    "ef_ddpm": {"skip": 1},
    "partedit": {"dtype": "fp32", "mask_size": 64},
    "imagic": {"embedding_steps": 4, "finetune_steps": 4},
    "cpam": {"start_step": 1, "start_layer": 3, "null_inner_steps": 2},
    "dragdiffusion": {"lora_steps": 2, "lora_batch_size": 2, "n_pix_step": 2, "start_layer": 3},
    # 10 steps: the code's step windows (guidance, regional SDE, time travel: methods/dragon/sampler.py),
    # scaled from 50 steps, each keep at least one step
    "diffeditor": {"num_inference_steps": 10},
    "dragondiffusion": {"num_inference_steps": 10},
}


def compose_method(name: str, *overrides: str) -> dict:
    """The method config the CLI would resolve for ``method=<name> <overrides>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    extra = GENERIC if name == "diffusers_pipeline" else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}", *extra, *overrides])
    return OmegaConf.to_container(cfg.method, resolve=True)


def test_every_diffusion_config_is_covered():
    # the 28 shipped diffusion adapters: 12+ baselines, their SDXL variants, Paint-by-Example, generic, ZONE,
    # PartEdit and its real-image baselines, CPAM, FPE and Imagic, DiffEditor, DragonDiffusion, DragDiffusion
    # and Self-Guidance
    assert len(DIFFUSION_CONFIGS) == 28 and {"paint_by_example", "sdxl_inpaint", "ledits_pp_sdxl",
                                              "blended_latent_diffusion_sdxl", "zone", "partedit", "ef_ddpm",
                                              "pnp_inversion", "infedit", "cpam", "fpe", "imagic", "diffeditor",
                                              "dragondiffusion", "dragdiffusion", "self_guidance"} <= set(DIFFUSION_CONFIGS)


# -- the tiny VAE is shaped like SD's: spatial factor 8 -----------------------------------------
PIPELINES = {
    "sd15": "StableDiffusionImg2ImgPipeline",
    "ip2p": "StableDiffusionInstructPix2PixPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLImg2ImgPipeline",
    "sdxl_inpaint": "StableDiffusionXLInpaintPipeline",
    "paint_by_example": "PaintByExamplePipeline",
}


@pytest.mark.parametrize("kind", tiny.TINY_KINDS)
def test_tiny_vae_downsamples_by_8_like_the_real_one(kind):
    import diffusers
    import torch

    assert set(PIPELINES) == set(tiny.TINY_KINDS)
    parts = tiny.tiny_components(kind)
    vae = parts["vae"]
    # SD 1.x / 2.x / XL VAEs: four down blocks (three downsamplers), 4 latent channels
    assert len(vae.config.down_block_types) == 4 and len(vae.config.up_block_types) == 4
    assert vae.config.latent_channels == 4
    pipe = tiny.tiny_pipeline(kind, getattr(diffusers, PIPELINES[kind]))
    assert pipe.vae_scale_factor == 8 == tiny.VAE_SCALE_FACTOR
    # the pipelines' default size (UNet sample size x VAE factor) is the tiny working size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == tiny.TINY_RESOLUTION
    # a 48 x 64 image -> a 6 x 8 latent -> a 48 x 64 image
    x = torch.from_numpy(textured(48, 64, seed=3)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert tuple(z.shape) == (1, 4, 6, 8) and tuple(y.shape) == (1, 3, 48, 64)
    # the UNet runs on that latent (a grid its three / two levels do not divide evenly, as SD
    # does for sizes that are not multiples of 64)
    unet = parts["unet"]
    t = torch.tensor([10])
    c = unet.config.in_channels
    inp = torch.cat([z] * (c // 4) + ([z[:, :1]] if c % 4 else []), 1)
    assert inp.shape[1] == c
    kwargs = {}
    if kind.startswith("sdxl"):
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    ctx = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        eps = unet(inp, t, encoder_hidden_states=ctx, **kwargs).sample
    assert tuple(eps.shape) == (1, 4, 6, 8)


# -- "auto" parameters through Hydra --------------------------------------------------------------
@pytest.mark.parametrize("name", DIFFUSION_CONFIGS)
def test_tiny_alone_gives_small_defaults_real_gives_the_papers(name):
    cls = METHODS.get(name)
    shipped = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
    names = auto_names(cls.Params)
    assert {"num_inference_steps", "resolution"} <= set(names)
    assert all(shipped[n] == AUTO for n in names)  # the YAML leaves them to the backbone

    real = build_method(compose_method(name)).params if name != "diffusers_pipeline" else None
    small = build_method(compose_method(name, "++method.backbone=tiny")).params
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    expected_tiny = {"num_inference_steps": tiny.TINY_STEPS, "resolution": tiny.TINY_RESOLUTION,
                     **TINY_EXTRA.get(name, {})}
    assert {n: getattr(small, n) for n in names} == {n: expected_tiny.get(n) for n in names}
    assert small.auto_resolved == expected_tiny
    if real is not None:  # the generic adapter has no real model by default
        want = {n: fields[n].metadata["auto"].real for n in names}
        want = {n: (v(real) if callable(v) else v) for n, v in want.items()}
        assert {n: getattr(real, n) for n in names} == want
        # the papers' sizes; InfEdit samples a latent consistency model, 15 steps in its demo
        assert real.resolution >= 512 and real.num_inference_steps >= (15 if name == "infedit" else 20)


def test_paper_defaults_with_real_weights():
    # spot checks of the values "auto" stands for with real weights (the papers' / libraries')
    p = {n: build_method(compose_method(n)).params for n in
         ("instruct_pix2pix", "diffedit", "sdxl_inpaint", "plug_and_play", "prompt_to_prompt", "masactrl",
          "ledits_pp", "ledits_pp_sdxl")}
    assert (p["instruct_pix2pix"].num_inference_steps, p["instruct_pix2pix"].resolution) == (100, 512)
    assert (p["diffedit"].num_inference_steps, p["diffedit"].resolution) == (50, 768)
    assert (p["sdxl_inpaint"].num_inference_steps, p["sdxl_inpaint"].resolution) == (20, 1024)
    assert p["plug_and_play"].inversion_steps == 999 and p["prompt_to_prompt"].num_inner_steps == 10
    assert (p["masactrl"].start_step, p["masactrl"].start_layer) == (4, 10)
    assert p["ledits_pp"].use_intersect_mask is True and p["ledits_pp_sdxl"].use_intersect_mask is False
    assert (p["ledits_pp"].num_inference_steps, p["ledits_pp_sdxl"].resolution) == (30, 1024)


@pytest.mark.parametrize("overrides, expected", [
    (["method.resolution=96"], {"resolution": 96, "num_inference_steps": 4, "inversion_steps": 4}),
    (["method.num_inference_steps=6"], {"resolution": 64, "num_inference_steps": 6, "inversion_steps": 6}),
    (["method.resolution=null"], {"resolution": None, "num_inference_steps": 4}),  # source size
    (["method.inversion_steps=999"], {"inversion_steps": 999, "num_inference_steps": 4}),
    (["method.resolution=auto", "method.num_inference_steps=auto"], {"resolution": 64, "num_inference_steps": 4}),
])
def test_explicit_values_beat_tiny_defaults(overrides, expected):
    p = build_method(compose_method("plug_and_play", "++method.backbone=tiny", *overrides)).params
    assert {k: getattr(p, k) for k in expected} == expected
    explicit = {o.split("=")[0].split(".")[1] for o in overrides if not o.endswith("=auto")}
    assert not explicit & set(p.auto_resolved)  # only what was left at auto is reported as resolved


def test_explicit_values_beat_real_defaults_and_bad_ones_still_fail():
    from harness.method import ParamError

    p = build_method(compose_method("sdedit", "method.resolution=96", "method.num_inference_steps=3")).params
    assert (p.resolution, p.num_inference_steps, p.auto_resolved) == (96, 3, {})
    # a tiny run still validates what it is given
    with pytest.raises(ParamError, match="resolution"):
        build_method(compose_method("sdedit", "++method.backbone=tiny", "method.resolution=30"))
    with pytest.raises(ParamError, match="ledits_pp.*resolution.*32"):
        build_method(compose_method("ledits_pp", "++method.backbone=tiny", "method.resolution=48"))
    with pytest.raises(ParamError, match="num_inference_steps"):
        build_method(compose_method("sdedit", "++method.backbone=tiny", "method.num_inference_steps=fast"))
    # "auto" is only a value where the parameter declares it
    with pytest.raises(ParamError, match="guidance_scale"):
        build_method(compose_method("sdedit", "method.guidance_scale=auto"))


# -- the resolved values identify the edit ------------------------------------------------------------
def _job(builder, tmp_path, method: dict) -> Job:
    return Job(JobConfig.from_mapping(job_config(builder.config(), tmp_path / "res", method=method,
                                                 metrics=PIXEL_L1)))


def test_resolved_values_are_the_params_and_change_the_edit_key(builder, tmp_path):
    add_two_samples(builder)
    auto = _job(builder, tmp_path, compose_method("sdedit", "++method.backbone=tiny"))
    same = _job(builder, tmp_path, compose_method("sdedit", "++method.backbone=tiny", "method.resolution=64",
                                                  "method.num_inference_steps=4"))
    steps = _job(builder, tmp_path, compose_method("sdedit", "++method.backbone=tiny", "method.num_inference_steps=5"))
    size = _job(builder, tmp_path, compose_method("sdedit", "++method.backbone=tiny", "method.resolution=72"))
    real = _job(builder, tmp_path, compose_method("sdedit"))
    # the job's parameters (its key's and its tables' "params") hold values, never "auto"
    assert auto.params["num_inference_steps"] == 4 and auto.params["resolution"] == 64
    assert real.params["num_inference_steps"] == 50 and real.params["resolution"] == 512
    ref = auto.dataset.refs()[0]
    keys = [j.key_for(ref) for j in (auto, same, steps, size)]
    # the same computation (auto resolved to 4 steps at 64 px, or asked for explicitly): one key;
    # another resolved value: another key
    assert keys[0] == keys[1] and len(set(keys[1:])) == 3


def test_tiny_smoke_edit_records_the_resolved_values(builder, tmp_path):
    from harness.cache import EditStore

    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method=compose_method("sdedit", "++method.backbone=tiny"),
                     metrics=PIXEL_L1)
    out = run_job(cfg)
    assert out.counts == {"ok": 2, "skipped": 0, "failed": 0}
    edits = read_edits(out).set_index("sample_id")
    store = EditStore(Path(cfg["results_dir"]) / cfg["run_name"] / "edits")
    for sid, (h, w) in TWO_SIZES.items():
        rec = store.get(edits.loc[sid, "edit_key"])
        info = json.loads((rec.folder / "edit.json").read_text())["info"]
        assert info["auto_params"] == {"num_inference_steps": 4, "resolution": 64}
        assert info["steps"] == 4 and info["working_size_hw"] == [64, 64]
        assert info["denoising_steps"] == 3  # int(4 steps x strength 0.8)
        assert np.asarray(rec.image()).shape == (h, w, 3)
    # the job's manifest records the resolved parameters too
    manifest = json.loads((out.job_dir / "manifest.json").read_text())
    assert manifest["method"]["params"]["num_inference_steps"] == 4
    assert manifest["method"]["params"]["resolution"] == 64
    loading.clear_cache()


# -- tiny edits run single-threaded ---------------------------------------------------------------
@pytest.mark.parametrize("name", DIFFUSION_CONFIGS)
def test_every_adapter_edit_is_wrapped_for_tiny_threads(name):
    # an adapter that overrides edit() gets the wrapper too (its own edit and the base's)
    cls = METHODS.get(name)
    assert getattr(cls.edit, "tiny_threads", False) is True


def test_tiny_edit_runs_one_torch_thread_and_restores_the_count(builder, tmp_path, monkeypatch):
    import torch

    from harness.data import open_dataset
    from methods._diffusion_common import tiny_threads

    seen: list[int] = []
    cls = METHODS.get("sdedit")
    original = cls.call_pipeline

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "call_pipeline", spy)
    add_two_samples(builder)
    ds = open_dataset(builder.config())
    sample = ds.load(ds.refs()[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = build_method(compose_method("sdedit", "++method.backbone=tiny")).edit(sample, 0)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and after == 2 and out.image.shape == (*TWO_SIZES["a"], 3)

    # real weights: the thread count is left alone (a stand-in edit, no weights needed)
    class Fake:
        def __init__(self, backbone):
            self.params = type("P", (), {"backbone": backbone})()

    @tiny_threads
    def count(self, sample, seed):
        return torch.get_num_threads()

    torch.set_num_threads(2)
    try:
        assert count(Fake("real"), None, 0) == 2 and count(Fake("tiny"), None, 0) == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
