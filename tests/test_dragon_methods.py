"""The ``diffeditor`` and ``dragondiffusion`` adapters through the harness (tiny backbones)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import methods.diffeditor  # noqa: F401  (registers; the lead adds both to methods/__init__.py)
import methods.dragondiffusion  # noqa: F401
from harness.method import ParamError
from harness.registry import METHODS
from harness.runner import run_job
from harness.types import Sample

from .conftest import job_config, read_edits, textured

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[1]
#: one embedded-set sample per task kind
TASK_SAMPLES = {
    "drag": "rocket_drag_taller",
    "face": "astronaut_smile",
    "move": "rocket_move_left",
    "paste": "astronaut_paste_dahlia",
    "appearance": "astronaut_suit_navy",
}
SAMPLE_SET = {"name": "sample", "format": "generic", "root": str(ROOT / "datasets" / "sample")}


def _make(name, **params):
    cls = METHODS.get(name)
    return cls(cls.parse_params({"backbone": "tiny", **params}))


@pytest.mark.parametrize("name", ["diffeditor", "dragondiffusion"])
def test_params_defaults_match_the_yaml(name):
    cls = METHODS.get(name)
    p = cls.Params()
    assert (p.num_inference_steps, p.guidance_scale, p.resolution, p.cfg_variant, p.sde_variant) == (
        50, 5.0, 512, "paper", "code")
    assert (p.sde_start, p.sde_end, p.time_travel_start, p.time_travel_end, p.time_travel_repeats) == (11, 20, 21, 30, 3)
    assert (p.image_prompt_start, p.image_prompt_end) == (10, 20)
    plan = cls(p).plan()
    assert (plan.sde_window, plan.time_travel_steps, plan.image_window) == ((11, 20), (22, 24, 26, 28), (10, 20))
    assert (p.guidance_end, p.guidance_dense_end, p.bank_start, p.bank_mix_end) == (30, 10, 5, 35)
    on = name == "diffeditor"
    assert (p.image_prompt, p.regional_sde, p.time_travel, p.regional_guidance) == (on, on, on, on)
    if not on:  # the released code's 'D' mode mixes the gradients regionally: allowed
        assert cls.parse_params({"backbone": "tiny", "regional_guidance": True}).regional_guidance is True
    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    assert cfg.pop("name") == name
    fields = {f.name: f for f in dataclasses.fields(cls.Params) if f.init}
    assert set(cfg) == set(fields)
    for k, v in cfg.items():
        d = fields[k].default
        d = d.value if hasattr(d, "value") else d
        assert v == d or v == "auto", (k, v, d)
    cls.parse_params(cfg)
    text = (ROOT / "conf" / "method" / f"{name}.yaml").read_text().lower()
    assert "sec." in text and ("not specified by the paper" in text or name == "dragondiffusion")
    t = cls.parse_params({"backbone": "tiny"})
    assert (t.num_inference_steps, t.resolution) == (10, 64)


def test_bad_parameters_are_refused():
    for bad in ({"sde_variant": "both"}, {"cfg_variant": "x"}, {"sde_start": -1}, {"time_travel_repeats": 0},
                {"energy_scale": -1.0}, {"task": "rotate"}, {"guidance_rule": "always"}, {"resolution": None}):
        with pytest.raises((ParamError, ValueError)):
            METHODS.get("diffeditor").parse_params({"backbone": "tiny", **bad})
    for on in ("image_prompt", "regional_sde", "time_travel"):
        with pytest.raises((ParamError, ValueError), match="belong to DiffEditor"):
            METHODS.get("dragondiffusion").parse_params({"backbone": "tiny", on: True})


def test_per_task_values_follow_the_code_and_the_variants():
    de = _make("diffeditor")
    v = {k: de.task_values(k) for k in TASK_SAMPLES}
    assert {k: x["energy_scale"] for k, x in v.items()} == {"drag": 2000.0, "face": 3000.0, "move": 500.0,
                                                            "paste": 1500.0, "appearance": 2000.0}
    assert all(x["guidance_scale"] == 5.0 for x in v.values())
    etas = (v["drag"]["eta_in"], v["drag"]["eta_out"], v["face"]["eta_in"], v["face"]["eta_out"])
    assert etas == (0.4, 0.0, 0.2, 0.2)
    assert (v["move"]["ip_scale"], v["face"]["ip_scale"]) == (0.1, 0.05)
    demo = _make("diffeditor", cfg_variant="demo", sde_variant="paper")
    assert demo.task_values("move")["guidance_scale"] == 4.0 and demo.task_values("appearance")["guidance_scale"] == 5.0
    assert demo.task_values("drag")["eta_out"] == 0.2
    assert _make("diffeditor", energy_scale=0.0, sde_strength_outside=0.1).task_values("paste")["eta_out"] == 0.1


def _job(tmp_path, method, ids, run="t"):
    cfg = job_config({**SAMPLE_SET, "ids": list(ids)}, tmp_path / "results",
                     method={"name": method, "backbone": "tiny"},
                     metrics={"protocol": "test", "regions": ["all"], "items": {"l1": {}}}, run_name=run)
    return cfg


def _infos(cfg, outcome):
    from harness.cache import EditStore

    edits = read_edits(outcome).set_index("sample_id")
    store = EditStore(Path(cfg["results_dir"]) / cfg["run_name"] / "edits")
    out = {}
    for sid in edits.index:
        rec = store.get(edits.loc[sid, "edit_key"])
        out[sid] = json.loads((rec.folder / "edit.json").read_text())["info"] if rec is not None else None
    return edits, out


@pytest.mark.parametrize("name", ["diffeditor", "dragondiffusion"])
def test_every_task_runs_through_the_harness(tmp_path, name):
    """One embedded-set sample of each task, tiny backbone (random weights, 10 steps): every edit
    made, its task, memory bank and network counts recorded."""
    cfg = _job(tmp_path, name, TASK_SAMPLES.values())
    outcome = run_job(cfg)
    edits = read_edits(outcome).set_index("sample_id")
    assert outcome.counts == {"ok": 5, "skipped": 0, "failed": 0}, edits.reason.tolist()
    _, infos = _infos(cfg, outcome)
    n = 10
    bank = {"drag": "concat", "face": "concat", "move": "replace", "paste": "mix", "appearance": "mix"}
    for kind, sid in TASK_SAMPLES.items():
        info = infos[sid]
        assert info["task"] == kind and info["memory_bank_mode"] == bank[kind]
        assert info["algorithm"] == name and info["working_size_hw"] == [64, 64]
        calls = info["network_calls"]
        # the inversion (n) + the step loop (n; no time-travel step in a 10-step run's positions)
        assert calls["unet"] == 2 * n, calls
        assert calls["estimator"] > 0 and info["guided_steps"]
        assert calls["vae_encode"] == (2 if kind in ("paste", "appearance") else 1) and calls["vae_decode"] == 1
        assert info["memory_bank_applied"] > 0
        if name == "diffeditor":
            # encoder on the image and on the zero image, per image (paste / appearance: base + reference)
            assert calls["image_encoder"] == calls["image_proj"] == (4 if kind in ("paste", "appearance") else 2)
            assert info["image_prompt"] is True and info["image_prompt_steps"] == [2, 3]
            assert info["sde_steps"] == [3] and info["sde_noise_outside_max"] == (0.0 if kind != "face" else
                                                                                info["sde_noise_outside_max"])
        else:
            assert "image_encoder" not in calls and info["image_prompt"] is False
            assert info["sde_steps"] == [] and info["time_travel_steps"] == []
            assert info["guided_steps"] == [0, 1, 2, 3, 4, 5]  # every step at positions < 30
        assert edits.loc[sid, "prep_seconds"] > 0 and edits.loc[sid, "infer_seconds"] > 0


def _drag_sample():
    m = np.zeros((64, 64), bool)
    m[16:48, 16:48] = True
    return Sample(id="d", dataset="x", source=textured(64, 64, 3), source_caption="a red thing", mask=m,
                  category="drag", source_points=np.array([[28.0, 30.0]]), target_points=np.array([[40.0, 34.0]]))


def test_diffeditor_50_steps_counts_time_travel_and_offload():
    """At the code's 50 steps: guidance on 0..9 and the even steps to 28, time travel on
    22..28 (U = 3: 2 more predictions and 3 rollbacks each), SDE 11..19, image prompt 10..19;
    the bank offloaded to host memory gives the same edit."""
    s = _drag_sample()
    a = _make("diffeditor", num_inference_steps=50).edit(s, 0)
    info = a.info
    assert info["guided_steps"] == list(range(10)) + list(range(10, 30, 2))
    assert info["time_travel_steps"] == [22, 24, 26, 28]
    assert info["sde_steps"] == list(range(11, 20)) and info["image_prompt_steps"] == list(range(10, 20))
    assert info["network_calls"]["unet"] == 50 + 50 + 4 * (2 + 3)
    assert info["network_rows"]["unet"] == 50 + 2 * (50 + 4 * 2) + 4 * 3  # CFG rows: 2 per prediction
    assert info["sde_noise_outside_max"] == 0.0 and info["memory_bank_offloaded"] is False
    assert info["memory_bank_device"] == info["device"]  # the pipeline's device (cpu here)
    b = _make("diffeditor", num_inference_steps=50, offload_memory_bank=True).edit(s, 0)
    assert b.info["memory_bank_device"] == "cpu" and b.info["memory_bank_offloaded"] is True
    assert b.info["memory_bank_bytes"] == info["memory_bank_bytes"] > 0
    assert np.array_equal(a.image, b.image)


def test_dragondiffusion_needs_no_image_prompt_and_ablation_switches(tmp_path):
    s = _drag_sample()
    d = _make("dragondiffusion", ip_weights=str(tmp_path / "absent.bin")).edit(s, 0)
    assert "image_encoder" not in d.info["network_calls"] and d.info["image_prompt_weights"] is None
    # DiffEditor with its three additions off and no guidance: no image encoder, no SDE, no rollbacks
    e = _make("diffeditor", image_prompt=False, regional_sde=False, time_travel=False, energy_scale=0.0,
              num_inference_steps=50).edit(s, 0)
    calls = e.info["network_calls"]
    assert "image_encoder" not in calls and "estimator" not in calls and calls["unet"] == 100
    assert e.info["sde_steps"] == [] and e.info["time_travel_steps"] == [] and e.info["guided_steps"] == []


def test_missing_image_prompt_weights_skip_every_sample(tmp_path):
    ids = [TASK_SAMPLES["drag"], TASK_SAMPLES["paste"]]
    cfg = _job(tmp_path, "diffeditor", ids)
    cfg["method"]["ip_weights"] = str(tmp_path / "ip_sd15_64.bin")
    outcome = run_job(cfg)
    edits = read_edits(outcome).set_index("sample_id")
    assert outcome.counts == {"ok": 0, "skipped": 2, "failed": 0}, edits.reason.tolist()
    for sid in ids:
        assert "'method.ip_weights'" in edits.loc[sid, "reason"] and "does not exist" in edits.loc[sid, "reason"]


def test_a_sample_without_its_task_fields_is_skipped_naming_it(tmp_path):
    m = _make("diffeditor")
    s = Sample(id="plain", dataset="x", source=textured(64, 64, 1), source_caption="x", category="remove")
    reason = m.check(s)
    assert reason and "plain" in reason and "source_points" in reason
    s2 = Sample(id="pst", dataset="x", source=textured(64, 64, 1), category="paste", mask=np.ones((64, 64), bool))
    assert "reference" in m.check(s2) and "pst" in m.check(s2)


def test_a_task_that_cannot_be_built_is_skipped_naming_the_sample_and_field():
    from harness.types import SkipSample

    m = _make("diffeditor", image_prompt=False, energy_scale=0.0)
    mask = np.zeros((256, 256), bool)
    mask[100, 100] = True  # one source pixel: no feature cell at the 64 px working size
    ref_mask = np.zeros((64, 64), bool)
    ref_mask[10:50, 10:50] = True
    s = Sample(id="speck", dataset="x", source=textured(256, 256, 1), source_caption="x", category="appearance",
               mask=mask, reference=textured(64, 64, 2), reference_mask=ref_mask)
    assert m.check(s) is None
    with pytest.raises(SkipSample, match="speck") as e:
        m.edit(s, 0)
    assert "mask" in str(e.value)


def test_weights_status_names_the_image_prompt_files(tmp_path):
    """`edit-harness weights`: DiffEditor's image prompt needs ip_sd15_64.bin (a local file) and the
    image encoder, each named with how to provide it; DragonDiffusion (no image prompt) needs neither."""
    from harness.registry import METHODS

    import methods  # noqa: F401

    de = METHODS.get("diffeditor")
    status = dict(de(de.parse_params({"image_encoder": str(tmp_path)})).weights_status())
    assert status["image prompt ip_sd15_64.bin"].startswith("method.ip_weights is not set")
    assert status[f"image encoder {tmp_path} (models/image_encoder)"] is None  # a local folder
    missing = tmp_path / "nope.bin"
    status = dict(de(de.parse_params({"ip_weights": str(missing)})).weights_status())
    assert status[f"image prompt {missing}"].startswith("the file does not exist")
    weights = tmp_path / "ip.bin"
    weights.write_bytes(b"x")
    assert dict(de(de.parse_params({"ip_weights": str(weights)})).weights_status())[f"image prompt {weights}"] is None
    assert not any("image" in what for what, _ in de(de.parse_params({"image_prompt": False})).weights_status())
    dd = METHODS.get("dragondiffusion")
    assert [what for what, _ in dd(dd.parse_params({})).weights_status()] == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    tiny = dict(de(de.parse_params({"backbone": "tiny"})).weights_status())
    assert any(k.startswith("image prompt: tiny encoder") and v is None for k, v in tiny.items())
