"""The diffusers-backed adapters (instruct_pix2pix, magicbrush, sdedit) through the whole harness.

Everything runs on ``backbone=tiny``: random-weight tiny pipelines of the real diffusers classes
(methods/diffusion/tiny.py), so no test touches the network or needs real weights.
"""
from __future__ import annotations

import json
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
from harness.runner import run_job
from methods._diffusion_common import RANDOM_WEIGHTS_TAG, working_size
from methods.diffusion.tiny import RANDOM_WEIGHTS_LABEL

from .conftest import PIXEL_L1, job_config

# method -> (tiny backbone kind, the sample field holding its prompt)
METHODS_UNDER_TEST = {
    "instruct_pix2pix": ("ip2p", "instruction"),
    "magicbrush": ("ip2p", "instruction"),
    "sdedit": ("sd15", "target_caption"),
}
FAST = {"backbone": "tiny", "num_inference_steps": 2, "resolution": 32}
PIXEL = PIXEL_L1


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _edits(outcome) -> pd.DataFrame:
    return pd.read_parquet(outcome.job_dir / "edits.parquet")


def _scores(outcome) -> pd.DataFrame:
    return pd.read_parquet(outcome.job_dir / "scores.parquet")


def _edit_files(results: Path, keys) -> dict[str, bytes]:
    store = EditStore(results / "test" / "edits")
    return {k: (store.folder(k) / "edit.png").read_bytes() for k in keys}


def _two_samples(builder) -> None:
    builder.add_simple("a", h=48, w=64, category="change_color", seed=1, instruction="make it blue")
    builder.add_simple("b", h=40, w=36, category="change_color", seed=2, instruction="turn it green")


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
def test_tiny_edit_cached_scored_labelled_and_seeded(name, builder, tmp_path):
    kind, prompt_field = METHODS_UNDER_TEST[name]
    _two_samples(builder)
    method = {"name": name, **FAST}
    cfg = job_config(builder.config(), tmp_path / "res", method=method, metrics=PIXEL)
    first = run_job(cfg)
    assert first.counts == {"ok": 2, "skipped": 0, "failed": 0}, _edits(first).reason.tolist()
    assert first.computed == 2 and first.scored == 2

    edits = _edits(first).set_index("sample_id")
    assert (edits.model_revision == f"tiny-random-{kind}").all()
    assert all(RANDOM_WEIGHTS_TAG in m for m in edits.method)
    assert (edits.infer_seconds > 0).all()
    store = EditStore(tmp_path / "res" / "test" / "edits")
    for sid, (h, w) in {"a": (48, 64), "b": (40, 36)}.items():
        folder = store.folder(edits.loc[sid, "edit_key"])
        with Image.open(folder / "edit.png") as im:
            assert im.size == (w, h) and im.mode == "RGB"
        info = json.loads((folder / "edit.json").read_text())["info"]
        assert info["weights"] == RANDOM_WEIGHTS_LABEL and info["random_weights"] is True
        assert info["revision"] == f"tiny-random-{kind}" and info["steps"] == 2
        assert info["working_size_hw"] == [32, 32] and info["prompt_field"] == prompt_field

    scores = _scores(first)
    assert set(scores.metric) == {"l1"} and set(scores.sample_id) == {"a", "b"}
    assert np.isfinite(scores.query("region == 'all'").value).all()
    assert (scores.query("region == 'all'").value > 0).all()  # random weights: the image changed

    again = run_job(cfg)
    assert again.computed == 0 and again.cached == 2 and again.scored == 0

    # Same seed in a fresh cache: byte-identical edit files. Another seed: different edits.
    keys = list(edits.edit_key)
    other = run_job(job_config(builder.config(), tmp_path / "res2", method=method, metrics=PIXEL))
    assert other.computed == 2
    assert _edit_files(tmp_path / "res", keys) == _edit_files(tmp_path / "res2", keys)
    reseeded = run_job(job_config(builder.config(), tmp_path / "res3", method=method, metrics=PIXEL, seed=1))
    new_keys = list(_edits(reseeded).edit_key)
    assert set(new_keys).isdisjoint(keys)
    assert _edit_files(tmp_path / "res3", new_keys) != _edit_files(tmp_path / "res", keys)


# Every diffusion adapter whose default is a real hub model (the generic adapter has none).
REAL_MODEL_ADAPTERS = sorted({*METHODS_UNDER_TEST, "diffedit", "sd_inpaint"})


@pytest.mark.parametrize("name", REAL_MODEL_ADAPTERS)
def test_uncached_real_model_skips_every_sample(name, builder, tmp_path, empty_hub):
    _two_samples(builder)
    model = METHODS.get(name).Params().model
    cfg = job_config(builder.config(), tmp_path / "res", method={"name": name, "num_inference_steps": 2},
                     metrics=PIXEL)
    out = run_job(cfg)
    assert out.counts == {"ok": 0, "skipped": 2, "failed": 0}
    edits = _edits(out)
    assert (edits.status == "skipped").all()
    for reason in edits.reason:
        assert model in reason and "backbone=tiny" in reason and "could not be prepared" in reason
    assert (edits.model_revision == f"uncached:{model}@main").all()
    assert len(_scores(out)) == 0


@pytest.mark.parametrize("name", sorted(METHODS_UNDER_TEST))
def test_sample_without_prompt_field_is_skipped(name, builder, tmp_path):
    _, field = METHODS_UNDER_TEST[name]
    builder.add_simple("ok", instruction="make it blue")
    builder.add_simple("nofield", **{field: None})
    builder.add_simple("blank", **{field: "   "})
    out = run_job(job_config(builder.config(), tmp_path / "res", method={"name": name, **FAST}, metrics=PIXEL))
    assert out.counts == {"ok": 1, "skipped": 2, "failed": 0}
    edits = _edits(out).set_index("sample_id")
    assert edits.loc["ok", "status"] == "ok"
    for sid in ("nofield", "blank"):
        reason = edits.loc[sid, "reason"]
        assert edits.loc[sid, "status"] == "skipped" and field in reason and sid in reason


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
    assert {"l1", "l2"} <= set(scores.metric)
