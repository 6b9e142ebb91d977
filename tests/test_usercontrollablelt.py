"""UserControllableLT (methods/usercontrollablelt.py, methods/stylegan2/latent_transformer.py) with a
random-weight latent transformer and the tiny StyleGAN2 generator."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

import methods.usercontrollablelt  # noqa: E402,F401  (registers the method)
from harness.cache import EditStore  # noqa: E402
from harness.registry import METHODS  # noqa: E402
from harness.runner import run_job  # noqa: E402
from methods.stylegan2.latent_transformer import LatentTransformer, load_transformer, tiny_transformer  # noqa: E402
from methods.usercontrollablelt import drag_tokens, transform  # noqa: E402

from .conftest import REPO, job_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
FACES = ["astronaut_smile", "grace_hopper_shift_right"]


def _inputs(dim=32, ch=16, b=2, t=5, q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, q, dim, generator=g), torch.randn(b, t, 3, generator=g), torch.randn(b, t, ch, generator=g))


def test_shapes_and_zero_drag_is_the_identity():
    T = tiny_transformer(32, 16)
    w, x, y = _inputs()
    out = T(w, x, y, alpha=1.0)
    assert out.shape == w.shape and torch.isfinite(out).all() and not torch.equal(out, w)
    # w_hat = w + alpha * h: alpha = |d| / 10 = 0 gives w back exactly, whatever the weights
    assert torch.equal(T(w, x, y, alpha=0.0), w)
    # and the change is linear in alpha (h does not depend on it)
    torch.testing.assert_close(T(w, x, y, alpha=2.5) - w, 2.5 * (out - w), rtol=1e-5, atol=1e-6)


def test_full_size_architecture_has_the_official_names_and_sizes():
    T = LatentTransformer()
    sd = T.state_dict()
    for k, shape in {"layer1.weight": (256, 3), "layer2.weight": (256, 512), "layer3.weight": (512, 512),
                     "layer4.weight": (512, 512), "mlp_head.0.weight": (512, 512),
                     "transformer_decoder.pos_embedding": (1, 6, 512),
                     "transformer_encoder.layers.5.0.fn.to_qkv.weight": (1536, 512),
                     "transformer_encoder.layers.5.1.fn.net.3.weight": (512, 512),
                     "transformer_decoder.layers.5.1.fn.to_q.weight": (512, 512),
                     "transformer_decoder.layers.5.1.fn.to_out.0.weight": (512, 512),
                     "transformer_decoder.layers.0.0.norm.weight": (512,)}.items():
        assert tuple(sd[k].shape) == shape, k
    assert "transformer_encoder.layers.6.0.norm.weight" not in sd  # depth 6


def test_cross_attention_matches_torch_attention():
    import torch.nn.functional as F

    T = tiny_transformer(32, 16)
    ca = T.transformer_decoder.layers[0][1].fn
    g = torch.Generator().manual_seed(1)
    xq, kv = torch.randn(1, 6, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    ours = ca(torch.cat([xq, kv], 1), query_length=6)
    h = ca.heads
    split = lambda t: t.reshape(1, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(ca.to_q(xq)), split(ca.to_k(kv)), split(ca.to_v(kv)))
    ref = ca.to_out(ref.transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_official_checkpoint_layout_loads(tmp_path):
    T = tiny_transformer(32, 16, seed=4)
    state = {"encoder." + k: v for k, v in T.state_dict().items()}
    state["decoder.convs.0.conv.weight"] = torch.zeros(1)  # the official file also holds its generator
    torch.save({"state_dict": state, "opts": {"stylegan_weights": "ffhq.pt", "lr": 0.001}}, tmp_path / "ffhq.pt")
    T2 = load_transformer(tmp_path / "ffhq.pt", heads=2)
    assert T2.config == T.config
    w, x, y = _inputs()
    assert torch.equal(T2(w, x, y, alpha=0.7), T(w, x, y, alpha=0.7))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "missing.pt")
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no UserControllableLT latent transformer"):
        load_transformer(tmp_path / "other.pt")


def test_tokens_and_transform():
    feat = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    x, y = drag_tokens(feat, np.array([[1, 2]]), np.array([[3.0, 4.0]]), np.array([[0, 3]]))
    torch.testing.assert_close(x, torch.tensor([[[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]]]))
    torch.testing.assert_close(y, torch.stack([feat[0, :, 2, 1], feat[0, :, 3, 0]])[None])
    T = tiny_transformer(32, 2)
    ws = torch.randn(1, 8, 32)
    assert transform(T, ws, x, y, 0.0, 6) is ws
    out = transform(T, ws, x, y, 0.5, 6)
    assert torch.equal(out[:, 6:], ws[:, 6:]) and not torch.equal(out[:, :6], ws[:, :6])


def _tiny(**kw):
    cls = METHODS.get("usercontrollablelt")
    return cls(cls.parse_params({"backbone": "tiny", "inversion_steps": 3, **kw}))


def test_no_drag_leaves_the_inverted_latent():
    from harness.types import Sample
    from .conftest import textured

    pts = np.array([[10.0, 12.0], [40.0, 30.0]])
    s = Sample(id="still", dataset="d", source=textured(48, 48), source_points=pts, target_points=pts.copy())
    out = _tiny().edit(s, 0)
    assert out.info["moving_points"] == 0 and out.info["stop_points"] == 2
    assert out.info["w_change"] == 0.0 and out.info["transformer_calls"] == 0
    assert "latent_transformer" not in out.info["network_calls"]


@pytest.mark.parametrize("multi_point, calls", [("sequential", 2), ("joint", 1)])
def test_multi_point_modes(multi_point, calls):
    from harness.types import Sample
    from .conftest import textured

    src = np.array([[10.0, 12.0], [40.0, 30.0], [20.0, 20.0]])
    tgt = src + np.array([[6.0, 0.0], [0.0, -5.0], [0.0, 0.0]])
    s = Sample(id="move", dataset="d", source=textured(48, 48), source_points=src, target_points=tgt)
    out = _tiny(multi_point=multi_point).edit(s, 0)
    info = out.info
    assert info["moving_points"] == 2 and info["stop_points"] == 1 and info["w_change"] > 0
    assert info["network_calls"]["latent_transformer"] == calls == info["transformer_calls"]
    # synthesis: 3 projector steps, one feature map per transformer call, one final image
    assert info["network_calls"]["generator"] == 3 + calls + 1


def _sample_cfg():
    return {"name": "sample", "format": "generic", "root": str(REPO / "datasets" / "sample"), "ids": FACES}


def test_runs_through_the_harness_on_the_face_samples(tmp_path):
    method = {"name": "usercontrollablelt", "backbone": "tiny", "inversion_steps": 4}
    out = run_job(job_config(_sample_cfg(), tmp_path, method=method))
    assert out.counts["ok"] == 2, out.counts
    e = pd.read_parquet(out.job_dir / "edits.parquet")
    assert e.method.str.contains("RANDOM WEIGHTS").all()
    store = EditStore(tmp_path / "test" / "edits")
    for key in e.edit_key:
        rec = store.get(key)
        assert rec.image().dtype == np.uint8
        info = rec.meta["info"]
        assert info["inversion"]["space"] == "w_plus" and info["moving_points"] > 0
        assert info["network_calls"]["latent_transformer"] == info["moving_points"]  # sequential


def test_missing_weights_are_clear_errors(tmp_path):
    from methods.diffusion.loading import MissingWeights

    cls = METHODS.get("usercontrollablelt")
    m = cls(cls.parse_params({}))
    problems = dict(m.weights_status())
    assert any("generator_path" in (p or "") for p in problems.values())
    assert any("transformer_path" in (p or "") for p in problems.values())
    from methods.stylegan2.generator import save_state_dict, tiny_generator

    save_state_dict(tiny_generator(), tmp_path / "g.pt")
    m = cls(cls.parse_params({"generator_path": str(tmp_path / "g.pt")}))
    with pytest.raises(MissingWeights, match="method.transformer_path"):
        m.prepare()
    m = cls(cls.parse_params({"generator_path": str(tmp_path / "g.pt"), "transformer_path": str(tmp_path / "t.pt")}))
    with pytest.raises(MissingWeights, match="t.pt' does not exist"):
        m.prepare()
    out = run_job(job_config(_sample_cfg(), tmp_path, method={"name": "usercontrollablelt"}))
    assert out.counts["skipped"] == 2
    assert pd.read_parquet(out.job_dir / "edits.parquet").reason.str.contains("generator_path").all()


def test_real_weights_from_user_files(tmp_path):
    """The real-weights path end to end with files written here (random weights in the official
    layouts): a generator .pt and a transformer checkpoint whose sizes fit it."""
    from harness.types import Sample
    from methods.stylegan2.generator import save_state_dict, tiny_generator
    from .conftest import textured

    save_state_dict(tiny_generator(), tmp_path / "g.pt")
    T = tiny_transformer(32, 16)
    torch.save({"state_dict": {"encoder." + k: v for k, v in T.state_dict().items()}}, tmp_path / "t.pt")
    cls = METHODS.get("usercontrollablelt")
    params = {"generator_path": str(tmp_path / "g.pt"), "transformer_path": str(tmp_path / "t.pt"),
              "transformer_heads": 2, "feature_resolution": 16, "inversion_steps": 2, "w_avg_samples": 100}
    m = cls(cls.parse_params(params))
    assert all(problem is None for _, problem in m.weights_status())
    assert m.model_revision().startswith("stylegan2-") and "+ucl-transformer-" in m.model_revision()
    src = np.array([[10.0, 12.0]])
    s = Sample(id="r", dataset="d", source=textured(32, 32), source_points=src, target_points=src + 8)
    out = m.edit(s, 0)
    assert not out.info["random_weights"] and out.info["transformer_calls"] == 1
    # the official checkpoint alone: transformer (encoder.*) + its generator (rosinality, decoder.*)
    from .test_stylegan2 import _rosinality_state

    state = {"encoder." + k: v for k, v in T.state_dict().items()}
    state.update({"decoder." + k: v for k, v in _rosinality_state().items()})
    torch.save({"state_dict": state, "latent_avg": torch.zeros(32), "opts": {}}, tmp_path / "ffhq.pt")
    one = cls(cls.parse_params({**params, "generator_path": None, "transformer_path": str(tmp_path / "ffhq.pt")}))
    assert all(problem is None for _, problem in one.weights_status())
    out = one.edit(s, 0)
    assert out.info["generator"].endswith("ffhq.pt") and out.info["transformer_calls"] == 1
    bad = cls(cls.parse_params({**params, "feature_resolution": 8}))  # 32-channel features: T takes 16
    with pytest.raises(ValueError, match="16 channels"):
        bad.prepare()
