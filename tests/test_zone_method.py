"""ZONE (methods/zone/): the fused sampler, the action classifier, the adapter through the harness.

Everything runs on tiny random-weight backbones (IP2P, a MagicBrush stand-in with other random
weights, a random-weight SAM): no network, no real weights.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import methods  # noqa: F401  (registers the methods)
from harness.cli import main
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample
from methods.zone import action as act
from methods.zone.method import RANDOM_CLASSIFIER, Zone, decode_mask, encode_mask
from methods.zone.sampler import fuse, fused_sample, plan_input, prepare_input, undo_padding

from .conftest import PIXEL_L1, job_config, read_edits, read_scores, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS = 3  # tiny runs: 3 steps exercise DPM-Solver++'s second-order updates


def tiny_zone(**params) -> Zone:
    return Zone(Zone.parse_params({"backbone": "tiny", "num_inference_steps": STEPS, **params}))


def sample(sid: str = "s", category: str | None = "remove", instruction: str = "remove the thing",
           h: int = 48, w: int = 64, seed: int = 3) -> Sample:
    return Sample(id=sid, dataset="t", source=textured(h, w, seed), instruction=instruction, category=category)


@pytest.fixture(scope="module")
def zone() -> Zone:
    """One prepared tiny ZONE (loading once for the module)."""
    m = tiny_zone()
    m.prepare()
    return m


# -- parameters ---------------------------------------------------------------------------------
def test_params_defaults_tiny_resolution_and_refusals():
    p = Zone.Params()
    assert (p.num_inference_steps, p.guidance_scale, p.image_guidance_scale) == (20, 7.5, 1.5)
    assert (p.beta_remove, p.beta_other, p.beta, p.scheduler) == (0.2, 0.01, None, "DPMSolverMultistepScheduler")
    assert (p.model, p.magicbrush_model, p.resolution, p.size_multiple) == (
        "timbrooks/instruct-pix2pix", "vinesmsuic/magicbrush-jul7", 512, 32)
    assert (p.mask_rule, p.fft_threshold, p.d0, p.dilate_iterations, p.close_kernel, p.feather_alpha) == (
        "code", 30.0, 200.0, 4, 21, 0.6)
    tiny = Zone.parse_params({"backbone": "tiny"})
    assert (tiny.num_inference_steps, tiny.resolution) == (4, 64)
    assert Zone.location_params == ("classifier_checkpoint", "sam_checkpoint")
    for bad, field in [({"scheduler": "PNDM"}, "scheduler"), ({"action": "move"}, "action"),
                       ({"beta": -0.1}, "beta"), ({"size_multiple": 12}, "size_multiple"),
                       ({"classifier_checkpoint": RANDOM_CLASSIFIER}, "classifier_checkpoint"),
                       ({"sam_settings": [1, 2]}, "sam_settings"), ({"feather_alpha": 1.5}, "feather_alpha"),
                       ({"mask_rule": "otsu"}, "mask_rule"), ({"classifier_quirk": "max"}, "classifier_quirk")]:
        with pytest.raises(ParamError, match=field):
            Zone.parse_params(bad)


# -- input preparation (ptp_utils.check_image_size) -----------------------------------------------
def test_prepare_input_resizes_pads_and_undoes():
    plan = plan_input((400, 600))  # landscape, longer than 512: 512 x int(400 * 512 / 600) = 341
    assert plan.resized_hw == (341, 512) and plan.padded_hw == (352, 512)
    assert (plan.top, plan.bottom, plan.left, plan.right) == (5, 6, 0, 0)
    img = textured(48, 70, 1)
    work, plan = prepare_input(img, 512, 32)  # not resized: padded 48 -> 64 (8 + 8), 70 -> 96 (13 + 13)
    assert work.shape == (64, 96, 3) and (plan.top, plan.left, plan.right) == (8, 13, 13)
    assert not work[:8].any() and not work[:, :13].any() and not work[:, -13:].any()  # black padding
    assert np.array_equal(undo_padding(work, plan), img)  # crop only: the source, exactly
    mask = np.zeros(plan.padded_hw, bool)
    mask[8:20, 13:30] = True
    assert undo_padding(mask, plan, is_mask=True).sum() == 12 * 17
    big = textured(80, 100, 2)
    work, plan = prepare_input(big, 64, 32)  # resized to 51 x 64, padded to 64 x 64, back to 80 x 100
    assert work.shape == (64, 64, 3) and plan.resized_hw == (51, 64)
    assert undo_padding(work, plan).shape == (80, 100, 3)
    assert undo_padding(np.ones((64, 64), bool), plan, is_mask=True).all()


# -- the fused sampler ------------------------------------------------------------------------------
def _run(pipe, mb, beta: float, steps: int = STEPS, seed: int = 0, capture: bool = True, **kw):
    """The fused sampler on a fixed 48 x 64 image (padded to 64 x 64), capture installed or not."""
    import torch

    from methods.diffusion.attention import attention_control
    from methods.zone.localise import ZoneCapture

    work, _ = prepare_input(textured(48, 64, 5), 64, 32)
    gen = torch.Generator("cpu").manual_seed(seed)
    # capture=False: the UNet's own (diffusers default) attention processors
    ctx = attention_control(pipe.unet, ZoneCapture(image_size=work.shape[:2])) if capture else contextlib.nullcontext()
    with ctx:
        return fused_sample(pipe, mb, work, "make it blue", steps=steps, guidance_scale=7.5,
                            image_guidance_scale=1.5, beta=beta, generator=gen, **kw)


def test_beta_zero_is_instruct_pix2pix_alone_bit_for_bit(zone):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    # the fused loop at beta 0 and the same loop without MagicBrush (same IP2P operations, same
    # capture processors): z + 0 * z_mb == z and / 1 are exact, so bit for bit
    fused = _run(zone._loaded.pipeline, zone._mb_unet, beta=0.0)
    alone = _run(zone._loaded.pipeline, None, beta=0.0)
    assert alone.latents_mb is None and fused.latents_mb is not None
    assert torch.equal(fused.latents, alone.latents) and np.array_equal(fused.image, alone.image)
    assert not torch.equal(fused.latents, fused.latents_mb)  # MagicBrush did run, on other weights
    # the loop without capture processors is diffusers' IP2P pipeline with the same scheduler and
    # noise: the same calls in the same order (encode_prompt, prepare_image_latents, CFG, step)
    plain = _run(zone._loaded.pipeline, None, beta=0.0, capture=False)
    pipe = zone._loaded.pipeline
    ref = StableDiffusionInstructPix2PixPipeline(**{**pipe.components,
                                                    "scheduler": DPMSolverMultistepScheduler.from_config(
                                                        pipe.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    work, _ = prepare_input(textured(48, 64, 5), 64, 32)
    out = ref("make it blue", image=Image.fromarray(work), num_inference_steps=STEPS, guidance_scale=7.5,
              image_guidance_scale=1.5, generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    assert torch.equal(out.images, plain.latents)


def test_beta_mixing_is_eq5_and_magicbrush_keeps_its_own_trajectory(zone):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    seen = []
    one = _run(zone._loaded.pipeline, zone._mb_unet, beta=0.2, steps=1,
               on_step=lambda i, t, z, z_mb: seen.append((z.clone(), z_mb.clone())))
    (z, z_mb), = seen
    assert torch.equal(one.latents, (z + 0.2 * z_mb) / 1.2)  # Eq. 5, the code's order of operations
    assert torch.equal(one.latents, fuse(z, z_mb, 0.2)) and not torch.equal(one.latents, z)
    # MagicBrush's latent is never fused: it equals MagicBrush run alone (IP2P's text embeddings
    # and VAE latents, MagicBrush's UNet)
    fused = _run(zone._loaded.pipeline, zone._mb_unet, beta=0.2)
    pipe = zone._loaded.pipeline
    mb_pipe = StableDiffusionInstructPix2PixPipeline(**{**pipe.components, "unet": zone._mb_unet})
    mb_alone = _run(mb_pipe, None, beta=0.0, capture=False)
    assert torch.equal(fused.latents_mb, mb_alone.latents)
    assert fused.timesteps == mb_alone.timesteps and len(fused.timesteps) == STEPS


def test_scheduler_parameter_builds_two_fresh_instances(zone):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    from methods.zone.sampler import make_scheduler

    pipe = zone._loaded.pipeline  # the tiny checkpoint's scheduler is DDIM (SD 1.5 values)
    a, b = make_scheduler(pipe.scheduler, "DPMSolverMultistepScheduler"), make_scheduler(pipe.scheduler,
                                                                                           "DPMSolverMultistepScheduler")
    assert a is not b and a.config.beta_schedule == pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert isinstance(make_scheduler(pipe.scheduler, "checkpoint"), DDIMScheduler)
    assert isinstance(make_scheduler(pipe.scheduler, "EulerAncestralDiscreteScheduler"), EulerAncestralDiscreteScheduler)
    with pytest.raises(ValueError, match="unknown diffusers scheduler class 'Nope'"):
        make_scheduler(pipe.scheduler, "Nope")
    ddim = _run(pipe, zone._mb_unet, beta=0.01, steps=2, scheduler="checkpoint")
    dpm = _run(pipe, zone._mb_unet, beta=0.01, steps=2)
    assert ddim.timesteps == [501, 1] and dpm.timesteps == [999, 500]  # DDIM "leading" + offset 1; DPM++ linspace


# -- masks, composite ---------------------------------------------------------------------------------
def test_all_ones_mask_gives_the_canvas_all_zeros_the_source(zone):
    import torch

    from methods.diffusion.attention import attention_control
    from methods.zone.localise import ZoneCapture

    s = sample()
    st = zone.run_stages(s, 7)
    ones, zeros = np.ones(s.source.shape[:2], bool), np.zeros(s.source.shape[:2], bool)
    assert np.array_equal(zone.blend(st.source, st.canvas, ones, ones), st.canvas)
    assert np.array_equal(zone.blend(st.source, st.canvas, zeros, zeros), s.source)
    # the canvas is the fused IP2P decode (remove: beta 0.2), padding cropped off
    pipe = zone._loaded.pipeline
    work, plan = prepare_input(s.source, 64, 32)
    with attention_control(pipe.unet, ZoneCapture(image_size=work.shape[:2])):
        direct = fused_sample(pipe, zone._mb_unet, work, s.instruction, steps=STEPS, guidance_scale=7.5,
                              image_guidance_scale=1.5, beta=0.2, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(st.canvas, undo_padding(direct.image, plan))
    # the edit is the composite of its own stages; its mask every pixel taken from the canvas
    out = zone.edit(s, 7)
    assert np.array_equal(out.image, zone.blend(st.source, st.canvas, st.fine, st.final))
    assert np.array_equal(out.mask, st.final | st.fine)
    differs = (out.image != s.source).any(-1)
    assert not (differs & ~out.mask).any()  # outside the mask: the source's own pixels
    masks = out.info["zone_masks"]
    assert np.array_equal(decode_mask(masks["rough"]), st.rough)
    assert np.array_equal(decode_mask(masks["sam"]), st.sam) and np.array_equal(decode_mask(masks["final"]), st.final)
    assert out.info["mask_areas"]["final"] == pytest.approx(st.final.mean())


def test_mask_codec_round_trip():
    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    s = encode_mask(m)
    assert s.isascii() and np.array_equal(decode_mask(s), m)


def test_ablation_switches(zone):
    s = sample(category="change_color", instruction="make it blue")
    no_sam = tiny_zone(use_sam=False)
    no_sam._loaded, no_sam._mb_unet, no_sam._mb_revision = zone._loaded, zone._mb_unet, zone._mb_revision
    st = no_sam.run_stages(s, 1)
    assert st.sam is None and np.array_equal(st.fine, st.rough) and st.info["sam"] == {}
    plain = tiny_zone(use_sam=False, use_smoother=False)
    plain._loaded, plain._mb_unet = zone._loaded, zone._mb_unet
    st2 = plain.run_stages(s, 1)
    assert np.array_equal(st2.final, st2.fine) and np.array_equal(st2.rough, st.rough)
    out = plain.edit(s, 1)  # no smoother: the canvas pasted through M_f, no feathered ring
    expect = np.where(st2.fine[..., None], st2.canvas, s.source)
    assert np.array_equal(out.image, expect)


# -- the action classifier ----------------------------------------------------------------------------
def _official_state(width: int = 768, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(128, width, generator=g), "fc1.bias": torch.randn(128, generator=g),
            "fc2.weight": torch.randn(3, 128, generator=g), "fc2.bias": torch.randn(3, generator=g)}


def test_classifier_loads_a_checkpoint_of_the_official_shape(tmp_path):
    import torch

    path = tmp_path / "action_classifier.pth"
    state = _official_state()
    torch.save(state, path)  # a plain state dict, as ckpts/action_classifier.pth
    mlp = act.load_classifier(path, 768)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(77, 768, generator=torch.Generator().manual_seed(1))
    expect = torch.relu(x @ state["fc1.weight"].T + state["fc1.bias"]) @ state["fc2.weight"].T + state["fc2.bias"]
    assert torch.allclose(mlp(x), expect, rtol=1e-5, atol=1e-4)  # same maths, other matmul order: float32 rounding
    with pytest.raises(act.ClassifierError, match=r"fc1.weight.*\[128, 768\].*expected \[128, 32\]"):
        act.load_classifier(path, 32)  # the official 768-wide file on the tiny 32-wide text encoder
    torch.save({"linear.weight": state["fc1.weight"]}, tmp_path / "other.pth")
    with pytest.raises(act.ClassifierError, match="expected the keys"):
        act.load_classifier(tmp_path / "other.pth", 768)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(act.ClassifierError, match="not a torch state dict"):
        act.load_classifier(tmp_path / "junk.pth", 768)


def test_label_rules_on_hand_made_logits():
    logits = np.zeros((6, 3))
    logits[4, 0] = 1.0  # change peaks at token 4 (the latest peak)
    logits[1, 1] = 9.0  # add peaks at token 1 with the highest logit overall
    logits[3, 2] = 2.0  # remove peaks at token 3
    assert act.label_from_logits(logits, "code") == 0  # argmax of the peak indices [4, 1, 3]
    assert act.label_from_logits(logits, "argmax") == 1
    tie = np.zeros((4, 3))
    tie[2, 1] = tie[2, 2] = 1.0  # add and remove both peak at token 2; change at 0: argmax -> first, add
    assert act.label_from_logits(tie, "code") == 1
    with pytest.raises(ValueError, match=r"\(tokens, 3\)"):
        act.label_from_logits(np.zeros((4, 2)))


def test_action_resolution_order_and_keywords():
    assert act.resolve_action("add", "remove the cat", "remove", "remove") == ("add", "param")
    assert act.resolve_action("auto", "remove the cat", "add", "change") == ("change", "classifier")
    assert act.resolve_action("auto", "remove the cat", "add", None) == ("add", "category")
    assert act.resolve_action("auto", "make it red", "change_color", None) == ("change", "category")
    assert act.resolve_action("auto", "add a stripe", "change", None) == ("change", "category")  # ZONE's set
    assert act.resolve_action("auto", "remove the cat", "move", None) == ("remove", "keyword")
    assert act.resolve_action("auto", "give him glasses", None, None) == ("add", "keyword")
    for text, expect in [("Get rid of the person on the left", "remove"), ("Take away the umbrella", "remove"),
                         ("get off his tie", "remove"), ("Put a frisbee next to the cat", "add"),
                         ("Attach a remote to the TV", "add"), ("Turn the bicycle into a motorcycle", "change"),
                         ("Replace the chair with a couch", "change"), ("paint the car red", "change"),
                         ("remove the hat and add a scarf", "remove"), ("add a hat, remove the scarf", "add"),
                         ("make the address red", "change")]:  # whole words only: "address" is not "add"
        assert act.keyword_action(text) == expect, text


def test_action_sources_and_beta_recorded(zone, tmp_path):
    import torch

    s = sample(category="remove", instruction="put a hat on it")
    assert zone.decide_action(s) == {"action": "remove", "action_source": "category"}
    assert zone.decide_action(sample(category=None, instruction="put a hat on it")) == {
        "action": "add", "action_source": "keyword"}
    forced = tiny_zone(action="change")
    forced._loaded = zone._loaded
    assert forced.decide_action(s) == {"action": "change", "action_source": "param"}
    assert (zone.beta_for("remove"), zone.beta_for("add"), tiny_zone(beta=0.5).beta_for("remove")) == (0.2, 0.01, 0.5)
    # a checkpoint of the official layout at the tiny text width (32): the classifier decides
    path = tmp_path / "cls.pth"
    torch.save(_official_state(32, seed=4), path)
    with_cls = tiny_zone(classifier_checkpoint=str(path))
    with_cls.prepare()
    pipe = with_cls._loaded.pipeline
    label, logits = act.classify(with_cls._classifier, pipe.tokenizer, pipe.text_encoder, s.instruction)
    assert logits.shape == (77, 3)
    got = with_cls.decide_action(s)
    assert got["action"] == label and got["action_source"] == "classifier" and got["classifier_label"] == label
    out = with_cls.edit(s, 0)
    assert out.info["action"] == label and out.info["beta"] == (0.2 if label == "remove" else 0.01)
    assert out.info["network_calls"]["action_classifier"] == 1
    rnd = tiny_zone(classifier_checkpoint=RANDOM_CLASSIFIER)
    rnd.prepare()
    got = rnd.decide_action(s)
    assert got["action_source"] == "classifier [RANDOM WEIGHTS]" and got["classifier_random_weights"] is True


# -- network counts -------------------------------------------------------------------------------
def test_network_counts_two_unet_calls_per_step(zone):
    out = zone.edit(sample(), 2)
    calls, rows = out.info["network_calls"], out.info["network_rows"]
    assert calls["unet"] == STEPS and calls["unet_magicbrush"] == STEPS  # one batched call each per step
    assert rows["unet"] == 3 * STEPS and rows["unet_magicbrush"] == 3 * STEPS  # [text+img, img, none]
    assert calls["vae_encode"] == 1 and calls["vae_decode"] == 1 and calls["text_encoder"] == 2
    assert calls["sam"] == 1 and "action_classifier" not in calls  # no checkpoint: category decided
    # MagicBrush's UNet shared with the magicbrush adapter, which watches it as "unet": still counted
    # as MagicBrush's only (the loader shares a cached pipeline between methods of one process)
    from methods.diffusion import counting

    counting.watch_module("unet", zone._mb_unet)
    again = zone.edit(sample(), 2).info["network_calls"]
    assert (again["unet"], again["unet_magicbrush"]) == (STEPS, STEPS)


# -- missing weights through the runner -----------------------------------------------------------
def _two(builder) -> None:
    for sid, cat, seed in (("a", "remove", 1), ("b", "change_color", 2)):
        builder.add_simple(sid, category=cat, seed=seed)
    builder.write()


@pytest.mark.parametrize("params, needles", [
    ({"sam_checkpoint": "no/such/sam_vit_h.pth"}, ["SAM vit_h checkpoint no/such/sam_vit_h.pth does not exist",
                                                    "method.sam_checkpoint", "use_sam=false"]),
    ({"classifier_checkpoint": "no/such/action_classifier.pth"},
     ["action classifier checkpoint no/such/action_classifier.pth does not exist", "ckpts/action_classifier.pth",
      "classifier_checkpoint=null"]),
])
def test_missing_checkpoint_skips_every_sample_naming_it(builder, tmp_path, params, needles):
    _two(builder)
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1,
                     method={"name": "zone", "backbone": "tiny", "num_inference_steps": 2, **params})
    out = run_job(cfg)
    edits = read_edits(out)
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    for reason in edits.reason:
        assert "could not be prepared" in reason and all(n in reason for n in needles), reason
    assert len(read_scores(out)) == 0


def test_bad_classifier_file_skips_naming_the_file(builder, tmp_path):
    _two(builder)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1,
                     method={"name": "zone", "backbone": "tiny", "num_inference_steps": 2,
                             "classifier_checkpoint": str(bad)})
    edits = read_edits(run_job(cfg))
    assert (edits.status == "skipped").all()
    assert all(str(bad) in r and "not a torch state dict" in r for r in edits.reason)


def test_missing_real_weights_name_every_model(builder, tmp_path, empty_hub):
    _two(builder)
    cfg = job_config(builder.config(), tmp_path / "res", metrics=PIXEL_L1, method={"name": "zone"})
    edits = read_edits(run_job(cfg))
    assert (edits.status == "skipped").all()
    for reason in edits.reason:
        for needle in ("InstructPix2Pix: weights of model 'timbrooks/instruct-pix2pix'",
                       "MagicBrush: weights of model 'vinesmsuic/magicbrush-jul7'",
                       "method.sam_checkpoint is not set", "backbone=tiny"):
            assert needle in reason, (needle, reason)
    assert set(edits.model_revision) == {"ip2p=uncached:timbrooks/instruct-pix2pix@main;"
                                         "magicbrush=uncached:vinesmsuic/magicbrush-jul7@main;"
                                         "sam=none;classifier=none"}
    status = Zone().weights_status()  # what `edit-harness weights` prints, without loading
    assert [w for w, _ in status][:3] == ["timbrooks/instruct-pix2pix", "vinesmsuic/magicbrush-jul7",
                                          "SAM vit_h checkpoint"]
    assert all(problem and "backbone=tiny" in problem for _, problem in status[:3])
    assert status[3][0].startswith("ZONE action classifier (not set") and status[3][1] is None


# -- the whole harness --------------------------------------------------------------------------------
def test_cli_run_on_the_sample_set_cached_scored_and_rerun_does_nothing(tmp_path):
    args = ["run", f"results_dir={tmp_path}", "metrics=pixel", "progress=false", "run_name=zone", "method=zone",
            "++method.backbone=tiny", "++method.num_inference_steps=2", "dataset.limit=2", "report=false"]
    assert main(args) == 0
    table, = (tmp_path / "zone" / "jobs").glob("*/edits.parquet")
    edits = pd.read_parquet(table)
    assert len(edits) == 2 and (edits.status == "ok").all(), edits.reason.tolist()
    assert all("[RANDOM WEIGHTS]" in m for m in edits.method)
    # the cost columns count both denoisers: 2 steps x (IP2P + MagicBrush) calls of 3 guidance rows
    assert (edits.unet_calls == 4).all() and (edits.unet_rows == 12).all()
    scores = pd.read_parquet(table.parent / "scores.parquet")
    assert len(scores) > 0 and scores.value.notna().all() and set(scores.sample_id) == set(edits.sample_id)
    with Image.open(Path(methods.__file__).parent.parent / "datasets" / "sample" / "images" / "coffee.png") as im:
        source_hw = im.size[::-1]
    assert max(source_hw) > 64  # resized to the working size and back
    actions = {}
    for key in edits.edit_key:
        folder = next((tmp_path / "zone" / "edits").glob(f"*/{key}"))
        info = json.loads((folder / "edit.json").read_text())["info"]
        actions[info["prompt"]] = (info["action"], info["action_source"], info["beta"])
        assert info["network_calls"]["unet"] == 2 and info["network_calls"]["unet_magicbrush"] == 2
        final, sam = (decode_mask(info["zone_masks"][k]) for k in ("final", "sam"))
        with Image.open(folder / "mask.png") as im:  # the stored mask: every pixel taken from the canvas
            assert np.array_equal(np.asarray(im.convert("L")) > 127, final | sam)
        assert final.shape == source_hw  # the source's size, not the 64 px working size
    # the sample set's first two: a remove and a change_color, decided by their categories
    assert actions == {"Remove the spoon from the saucer": ("remove", "category", 0.2),
                       "Make the cup blue": ("change", "category", 0.01)}
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "zone" / "edits").rglob("edit.json")}
    assert main(args) == 0  # the rerun: everything from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "zone" / "edits").rglob("edit.json")} == mtimes
    assert pd.read_parquet(table).equals(edits)
