"""CPAM (methods/cpam): the inversion + two-branch sampler and the harness adapter on the tiny
random-weight SD 1.5 backbone (no network, no real weights): PA/LE off equals plain sampling from
the inverted latent, empty and background-only edits against the inversion's own reconstruction
error, every edit type end to end, missing weights, UNet call counts and the CLI.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import methods.cpam  # noqa: F401  (registers cpam; the lead adds it to methods/__init__.py)
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample, SkipSample

from .conftest import (PIXEL_L1, add_two_samples, assert_missing_weights, disc_mask, job_config, run_tiny_job,
                       textured)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[1]
N = 3  # steps: the object adaptation (start_step 1) and the mask refinement (T_m 1) both act
FAST = {"backbone": "tiny", "num_inference_steps": N, "resolution": 64}
# A batched UNet call (4 rows: both branches, both CFG halves) vs the reference's separate calls:
# the kernels block the rows differently; float32 rounding (~1e-7 relative) through 3 tiny-UNet
# calls, amplified ~16x by CFG 7.5, on latents of magnitude ~3: measured 6e-5; a wrong row or a
# controller left on moves the latents by >= 1e-2.
ROWS = 5e-4


def _make(**params):
    cls = METHODS.get("cpam")
    return cls(cls.parse_params({**FAST, **params}))


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD 1.5 pipeline (shared, loaded once) and the 8 x 8 latent of a 64 x 64 image."""
    from methods.diffusion.inversion import encode_image

    m = _make()
    m.prepare()
    pipe = m._loaded.pipeline
    return m._loaded, pipe, encode_image(pipe, textured(64, 64, seed=3))


def _run(tiny, m_s, edit_type="replace", retain=False, **params):
    loaded, pipe, z0 = tiny
    m = _make(**params)
    m._loaded = loaded
    sample = Sample(id="s", dataset="d", source=textured(64, 64, 3), source_caption="a red thing",
                    target_caption="a blue thing")
    return m.run(pipe, z0, np.asarray(m_s, dtype=np.float32), sample, edit_type, retain, {})


def _reference(tiny, out, which: str):
    """Plain CFG DDIM sampling from the same inversion with the source (the inversion's own
    reconstruction) or the target prompt."""
    from methods.cpam.sampler import reference_sample

    _, pipe, _ = tiny
    null, src, tgt = out["embeddings"]
    return reference_sample(pipe.unet, out["schedule"], out["inversion"], src if which == "source" else tgt, null,
                            N, 7.5)


def _square(hw=(8, 8)):
    m = np.zeros(hw, dtype=np.float32)
    m[2:6, 2:6] = 1.0
    return m


# -- parameters ---------------------------------------------------------------------------------------
def test_params_defaults_yaml_and_validation():
    cls = METHODS.get("cpam")
    p = cls.Params()
    assert p.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (p.num_inference_steps, p.guidance_scale, p.inversion, p.resolution) == (50, 7.5, "null_text", 512)
    assert (p.start_step, p.start_layer, p.plain_fraction, p.use_pa, p.use_le) == (3, 8, 0.1, True, True)
    assert (p.edit_type, p.mask_strategy, p.refine_steps, p.null_inner_steps) == ("auto", "attention", 1, 10)
    t = cls.parse_params({"backbone": "tiny"})
    assert (t.num_inference_steps, t.start_step, t.start_layer, t.null_inner_steps, t.resolution) == (4, 1, 3, 2, 64)
    # the YAML lists every parameter with the dataclass' default ("auto" where the field is auto)
    cfg = yaml.safe_load((ROOT / "conf" / "method" / "cpam.yaml").read_text())
    assert cfg.pop("name") == "cpam"
    fields = {f.name: f for f in dataclasses.fields(cls.Params) if f.init}
    assert set(cfg) == set(fields)
    raw = cls.Params.__dataclass_fields__
    for k, v in cfg.items():
        d = raw[k].default
        assert v == (d.value if hasattr(d, "value") else d) or v == "auto", (k, v, d)
    text = (ROOT / "conf" / "method" / "cpam.yaml").read_text()
    assert "not specified by the paper" in text and "not specified by the paper" in methods.cpam.method.__doc__.lower()
    for bad in ({"inversion": "edict"}, {"edit_type": "move"}, {"plain_fraction": 1.5}, {"mask_strategy": "x"},
                {"intermediate": "later"}, {"start_layer": -1}, {"attention_threshold": 2.0}, {"resolution": None}):
        with pytest.raises((ParamError, ValueError)):
            cls.parse_params({**FAST, **bad})


# -- the sampler's invariants ------------------------------------------------------------------------
@pytest.mark.parametrize("inversion", ["null_text", "ddim"])
def test_pa_and_le_off_is_plain_sampling_from_the_inverted_latent(tiny, inversion):
    out = _run(tiny, _square(), use_pa=False, use_le=False, inversion=inversion)
    ref = _reference(tiny, out, "target")
    assert float((out["edit"] - ref).abs().max()) <= ROWS
    # and the controllers on change it by far more than the batching's rounding
    on = _run(tiny, _square(), inversion=inversion)
    assert float((on["edit"] - ref).abs().max()) > 100 * ROWS
    if inversion == "null_text":
        assert out["inversion"].uncond_per_step is not None and len(out["inversion"].uncond_per_step) == N
    else:
        assert out["inversion"].uncond_per_step is None
    assert len(out["inversion"].trajectory) == N + 1


@pytest.mark.parametrize("inversion", ["null_text", "ddim"])
def test_empty_edit_region_reconstructs_as_well_as_the_inversion(tiny, inversion):
    """M_s = M_t = 0: PA takes the source's keys/values everywhere (Eq. 1 with nothing masked), LE
    sends every query to the null prompt. The random-weight tiny UNet reconstructs poorly (the
    inversion's own error, mean |z - z_0| ~0.66 on latents of magnitude ~3); the edit must do no
    worse than that (measured 0.61, both inversions; 5 % slack for the float path) and better than
    plain target-prompt sampling (measured 0.73)."""
    _, _, z0 = tiny
    out = _run(tiny, np.zeros((8, 8)), edit_type="add", inversion=inversion)
    assert float(out["m_t"].sum()) == 0.0
    rec = _reference(tiny, out, "source")
    plain = _reference(tiny, out, "target")
    err = float((out["edit"] - z0).abs().mean())
    err_inv = float((rec - z0).abs().mean())
    err_plain = float((plain - z0).abs().mean())
    assert err <= 1.05 * err_inv, (err, err_inv)
    assert err < err_plain, (err, err_plain)


@pytest.mark.parametrize("inversion", ["null_text", "ddim"])
def test_background_branch_alone_keeps_the_unmasked_region(tiny, inversion):
    """PA only (no LE), no object retention, M_t = M_s (background type): outside the mask the
    target sees only the background branch, Eq. 1, whose keys inside M_s are masked out -- so it
    cannot equal the source's own attention, and the unmasked region's error may exceed the
    inversion's reconstruction error there by what those keys carried (measured +9 % / +10 % for
    null-text / DDIM on this random UNet). Bound: 1.2 x the inversion's error outside the mask."""
    import torch

    _, _, z0 = tiny
    m_s = _square()
    out = _run(tiny, m_s, edit_type="background", use_le=False, inversion=inversion)
    assert np.array_equal(out["m_t"], m_s)
    rec = _reference(tiny, out, "source")
    outside = torch.from_numpy(m_s < 0.5)
    err = float((out["edit"] - z0).abs()[..., outside].mean())
    err_inv = float((rec - z0).abs()[..., outside].mean())
    assert err <= 1.2 * err_inv, (err, err_inv)


def test_unet_call_counts(tiny):
    """Null-text inversion: N pivot calls, then per step 1 conditional + null_inner_steps
    optimisation calls + 2 for the step (early stop off); sampling: N batched calls. DDIM: N + N."""
    from methods.diffusion import counting

    _, pipe, z0 = tiny
    counting.watch_pipeline(pipe)
    for inversion, expected in (("null_text", N + N * (1 + 2 + 2) + N), ("ddim", 2 * N)):
        with counting.counting() as tally:
            _run(tiny, _square(), inversion=inversion, null_early_stop=0.0)
        calls, rows = tally.calls, tally.rows
        assert calls["unet"] == expected, (inversion, calls)
        # the sampling batch: 4 rows (uncond/cond x source/target) per step
        assert rows["unet"] - 4 * N == expected - N, (inversion, rows)


# -- edit types end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("category,edit_type", [("change_object", "replace"), ("change_pose", "pose_view"),
                                                ("change_background", "background"), ("remove", "remove"),
                                                ("add", "add")])
def test_each_edit_type_runs_end_to_end(category, edit_type, tiny):
    m = _make()
    m._loaded = tiny[0]
    mask = disc_mask(48, 64, 24, 32, 14)
    s = Sample(id="s1", dataset="d", source=textured(48, 64, 1), mask=mask, category=category,
               source_caption="a red ball on a table", target_caption="a blue ball on a table",
               meta={"object_prompt": "ball"})
    out = m.edit(s, 0)
    info = out.info
    assert out.image.shape == (48, 64, 3) and out.image.dtype == np.uint8
    assert out.mask.shape == (48, 64) and out.mask.dtype == bool
    assert info["edit_type"] == edit_type and info["edit_type_rule"] == f"category {category}"
    assert info["retain_object"] is (edit_type == "pose_view")
    assert info["source_mask_from"] == "sample mask"
    # M_s on the 8 x 8 latent grid: the disc (r 14 px of 48 x 64, resized to 64 x 64) -> cells at >= half cover
    assert 0.1 < info["source_mask_area"] < 0.4
    if edit_type == "remove":
        assert not out.mask.any() and info["target_mask_area"] == 0.0
        assert info["source_prompt_text"] == "" and info["target_prompt_text"] == ""
    elif edit_type == "background":
        assert info["target_mask_area"] == info["source_mask_area"]
    elif edit_type == "add":
        assert info["target_mask_area"] >= info["source_mask_area"]
    else:  # the attention M_t of the object word "ball": the tiny tokenizer has one token per
        # character, after the start token: "a" 1, "blue" 2-5, "ball" 6-9
        assert info["uses_attention_mask"] and info["mask_token_positions"] == [6, 7, 8, 9]
        assert info["mask_token_rule"] == "object_prompt 'ball'"
    assert info["network_calls"]["unet"] >= 2 * N and info["network_calls"]["vae_decode"] == 1
    assert info["prep_seconds"] > 0 and info["stage_seconds"]["inversion"] <= info["prep_seconds"]
    # one plain self-attention layer of the tiny UNet's 7 (round(0.1 * 7) = 1), the same every step
    assert len(info["plain_layers"]) == N and all(len(v) == 1 for v in info["plain_layers"].values())


def test_missing_mask_and_points_is_a_skip_naming_the_sample(builder, tmp_path):
    builder.add_simple("ok", category="change_object")
    builder.add_simple("nomask", category="change_object", mask=None)
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "cpam", **FAST, "num_inference_steps": 2},
                             metrics=PIXEL_L1))
    edits = pd.read_parquet(out.job_dir / "edits.parquet").set_index("sample_id")
    assert edits.loc["ok", "status"] == "ok"
    assert edits.loc["nomask", "status"] == "skipped"
    assert "nomask" in edits.loc["nomask", "reason"] and "M_s" in edits.loc["nomask", "reason"]


def test_sam_source_mask_from_a_box_and_without_a_checkpoint(builder, tmp_path):
    """A sample without a mask but with a box in meta gets M_s from SAM: on the tiny backbone
    ZONE's random-weight SAM (labelled); with real weights and no checkpoint the sample is skipped,
    naming it and method.sam_checkpoint (never a crash of the sweep)."""
    builder.add_simple("ok", category="change_object")
    builder.add_simple("boxed", category="change_object", mask=None, meta={"box": [10, 10, 40, 30]})
    run = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "cpam", **FAST,
                                                                          "num_inference_steps": 2},
                             metrics=PIXEL_L1))
    edits = pd.read_parquet(run.job_dir / "edits.parquet").set_index("sample_id")
    assert run.counts == {"ok": 2, "skipped": 0, "failed": 0}, edits.reason.tolist()
    froms = {}
    for sid in ("ok", "boxed"):
        folder = next((tmp_path / "res").rglob(f"edits/*/{edits.loc[sid, 'edit_key']}"))
        froms[sid] = json.loads((folder / "edit.json").read_text())["info"]["source_mask_from"]
    assert froms == {"ok": "sample mask", "boxed": "SAM (random weights, tiny backbone)"}
    real = METHODS.get("cpam")(METHODS.get("cpam").parse_params({"sam_checkpoint": str(tmp_path / "none.pth")}))
    s = Sample(id="boxed", dataset="d", source=textured(48, 64, 1), target_caption="a blue ball",
               meta={"box": [10, 10, 40, 30]})
    assert real.check(s) is None  # a box is enough to ask SAM
    with pytest.raises(SkipSample) as e:
        real.source_mask(s)
    assert "boxed" in str(e.value) and "method.sam_checkpoint" in str(e.value), str(e.value)
    no_prompt = dataclasses.replace(s, meta={})
    reason = real.check(no_prompt)
    assert "boxed" in reason and "M_s" in reason and "box" in reason


def test_uncached_real_model_skips_every_sample(builder, tmp_path, empty_hub):
    builder.add_simple("a")
    builder.add_simple("b", seed=2)
    model = METHODS.get("cpam").Params().model
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": "cpam", "num_inference_steps": 2},
                             metrics=PIXEL_L1))
    assert_missing_weights(out, model)


def test_whole_harness_tiny_job_cached(builder, tmp_path):
    add_two_samples(builder)
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": "cpam", **FAST, "num_inference_steps": 2},
                     metrics=PIXEL_L1)
    run = run_tiny_job(cfg, "sd15")
    for sid in ("a", "b"):
        info = run.info(sid)
        # change_color has no CPAM edit type: replace, said so
        assert info["edit_type"] == "replace" and "no CPAM edit type" in info["edit_type_rule"]


def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=cpam", "method=cpam",
            "++method.backbone=tiny", "++method.num_inference_steps=2", "dataset.limit=2", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "cpam" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    # inversion (null-text, 2 inner steps, early stop not reached on random weights) is preparation
    assert (edits.prep_seconds > 0).all() and (edits.infer_seconds > 0).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    # null-text inversion (2 pivot calls, per step 1 + 1..2 inner + 2) and 2 sampling calls of 4 rows
    assert edits.unet_calls.between(2 + 2 * (1 + 1 + 2) + 2, 2 + 2 * (1 + 2 + 2) + 2).all(), edits.unet_calls.tolist()
    types = []
    for key in edits.edit_key:
        folder = next((tmp_path / "cpam" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        types.append((info["edit_type"], info["edit_type_rule"]))
        with Image.open(folder / "mask.png") as im:  # the stored mask: M_t at the source's size
            stored = np.asarray(im.convert("L")) > 127
        assert stored.mean() == pytest.approx(info["target_mask_area"], abs=0.05)
    # the sample set's first two: a remove (M_t = 0) and a change_color (no CPAM type: replace)
    assert sorted(types) == [("remove", "category remove"),
                             ("replace", "category 'change_color' has no CPAM edit type: replace "
                                         "(the general object edit)")]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cpam" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cpam" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)


# -- rules -------------------------------------------------------------------------------------------
def test_intermediate_latent_indexing_and_the_cleaner_option(tiny):
    from methods.cpam.sampler import Inversion

    inv = Inversion(trajectory=list(range(N + 1)), uncond_per_step=None, kind="ddim")  # z_j stands for j
    # sampling step i runs at timesteps[i], the noise level of z_{N - i}
    assert [inv.intermediate(i) for i in range(N)] == [3, 2, 1]
    assert [inv.intermediate(i, "cleaner", 1) for i in range(N)] == [2, 1, 0]
    assert [inv.intermediate(i, "cleaner", 5) for i in range(N)] == [0, 0, 0]  # clamped at z_0
    same = _run(tiny, _square(), inversion="ddim")
    clean = _run(tiny, _square(), inversion="ddim", intermediate="cleaner", cleaner_k=1)
    assert float((same["edit"] - clean["edit"]).abs().max()) > 100 * ROWS


def test_edit_type_retention_and_prompt_rules():
    m = _make()
    s = Sample(id="s", dataset="d", source=textured(8, 8), category="change_pose", source_caption="a dog",
               target_caption="a sitting dog")
    assert m.edit_type_for(s) == ("pose_view", "category change_pose")
    assert m.retain_for(s, "pose_view") is True and m.retain_for(s, "replace") is False
    imba = dataclasses.replace(s, category="change_object", meta={"edit_type": "add", "retain_object": True})
    assert m.edit_type_for(imba) == ("add", "meta.edit_type") and m.retain_for(imba, "add") is True
    assert _make(edit_type="remove").edit_type_for(s) == ("remove", "parameter")
    assert _make(retain_object="false").retain_for(imba, "pose_view") is False
    assert m.prompts(s, "replace") == ("a dog", "a sitting dog")
    assert m.prompts(s, "remove") == ("", "")
    assert _make(remove_prompts="captions").prompts(s, "remove") == ("a dog", "a sitting dog")
    assert _make(source_prompt="empty").prompts(s, "replace") == ("", "a sitting dog")
    assert m.prompts(dataclasses.replace(s, source_caption=None), "replace") == ("", "a sitting dog")


def test_mask_refinement_uses_m_s_for_t_m_steps_then_the_attention_mask(tiny):
    """replace with the attention strategy: with T_m >= N the refined mask never takes over (M_t =
    M_s); with T_m = 1 the last step's M_t is the thesis rule over the target row's maps of
    steps 1 .. N-2 (those collected from step T_m on, before the last step)."""
    from methods.cpam import masks

    m_s = _square()
    never = _run(tiny, m_s, refine_steps=N)
    assert np.array_equal(never["m_t"], m_s)
    out = _run(tiny, m_s, refine_steps=1)
    maps = out["token_maps"]
    assert len(maps) == N and all(len(step) == len(maps[0]) > 0 for step in maps)
    expected = masks.attention_target_mask([m for step in maps[1:N - 1] for m in step], 0.25, size=(8, 8))
    assert np.array_equal(out["m_t"] >= 0.5, expected)
    assert not np.array_equal(expected, m_s >= 0.5)  # the refinement changed the mask here


def test_importing_the_package_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, methods.cpam; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
