"""The generic loader and image I/O on odd and broken inputs."""
from __future__ import annotations

import hashlib

import io

import numpy as np
import pytest
from PIL import Image

from harness.data import GenericDataset, open_dataset
from harness.images import load_image, load_mask
from harness.types import SampleError

from .conftest import REPO, disc_mask, textured


def _load(builder, sid):
    ds = open_dataset(builder.config())
    ref = next(r for r in ds.refs() if r.id == sid)
    return ds.load(ref)


def test_plain_sample_round_trip(builder):
    builder.add_simple("a", h=37, w=53)
    s = _load(builder, "a")
    assert s.source.dtype == np.uint8 and np.array_equal(s.source, textured(37, 53, 0))  # PNG: lossless
    assert s.mask.dtype == bool and np.array_equal(s.mask, disc_mask(37, 53, 37 / 2, 53 / 2, 37 / 4))
    assert s.category == "remove" and s.dataset == "synthetic"


def test_truncated_image_names_sample_and_field(builder):
    builder.add_simple("trunc")
    p = builder.root / "images" / "trunc.png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError) as e:
        _load(builder, "trunc")
    assert e.value.sample_id == "trunc" and e.value.field == "source"
    assert "truncated" in str(e.value) or "unreadable" in str(e.value)


def test_garbage_file_is_unreadable(builder):
    builder.add_simple("junk")
    (builder.root / "images" / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(SampleError, match="sample 'junk', field 'source'"):
        _load(builder, "junk")


def test_missing_file(builder):
    builder.add(id="gone", source="images/nothing.png")
    with pytest.raises(SampleError, match="file not found"):
        _load(builder, "gone")


def test_16bit_greyscale(tmp_path):
    arr = (np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    notes = []
    out = load_image(p, "s", "source", notes)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    expected = np.round(arr / 65535 * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert any("8 bits" in n for n in notes)


def test_16bit_colour(tmp_path):
    import cv2

    rgb16 = (textured(20, 30).astype(np.uint16) * 257)
    p = tmp_path / "c16.png"
    cv2.imwrite(str(p), rgb16[..., ::-1])
    out = load_image(p, "s", "source")
    assert np.array_equal(out, textured(20, 30))


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(textured(40, 40)).convert("CMYK").save(p, quality=95)
    notes = []
    out = load_image(p, "s", "source", notes)
    assert out.shape == (40, 40, 3)
    assert np.abs(out.astype(int) - textured(40, 40).astype(int)).mean() < 12
    assert any("CMYK" in n for n in notes)


def test_exif_rotation_applied(tmp_path):
    img = Image.fromarray(textured(20, 40))  # 40 wide, 20 high
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    notes = []
    out = load_image(p, "s", "source", notes)
    assert out.shape == (40, 20, 3)
    assert any("EXIF orientation 6" in n for n in notes)
    # orientation 6 displays the stored pixels turned 90 degrees clockwise: JPEG-close to that
    # turn (quality 95: ~5 levels), far from the other one
    turned = np.abs(out.astype(int) - np.rot90(textured(20, 40), -1)).mean()
    assert turned < 12 and np.abs(out.astype(int) - np.rot90(textured(20, 40), 1)).mean() > 50


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = load_image(p, "s", "source")
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[7, 7]) == (255, 255, 255)


def test_greyscale_and_palette(tmp_path):
    g = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 90, np.uint8)).save(g)
    grey = load_image(g, "s", "source")
    assert grey.shape == (5, 7, 3) and (grey == 90).all()
    pal = tmp_path / "p.png"
    Image.fromarray(textured(10, 10)).convert("P").save(pal)
    with Image.open(pal) as im:  # the palette's colours, looked up
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(load_image(pal, "s", "source"), expected)


def test_mask_size_mismatch(builder):
    builder.add_simple("mm", h=40, w=60)
    builder.image("masks/mm.png", disc_mask(30, 30, 15, 15, 5))
    with pytest.raises(SampleError) as e:
        _load(builder, "mm")
    assert e.value.field == "mask" and "30x30" in str(e.value) and "60x40" in str(e.value)


def test_mask_reads_alpha_and_threshold(tmp_path):
    a = np.zeros((6, 6, 4), np.uint8)
    a[:3, :, 3] = 255
    p = tmp_path / "m.png"
    Image.fromarray(a, "RGBA").save(p)
    m = load_mask(p, "s", "mask", (6, 6))
    assert m[:3].all() and not m[3:].any()


def test_manifest_problems_become_refs_with_errors(builder):
    builder.add_simple("ok")
    builder.add(id="nosource", instruction="x")
    builder.add(id="bad id!", source="images/ok.png")
    builder.add(id="ok", source="images/ok.png")
    builder.add(id="weird", source="images/ok.png", colour="red")
    with open(builder.root / "manifest.jsonl", "a") as f:
        f.write("{not json\n")
    ds = open_dataset(builder.config())
    refs = ds.refs()
    errors = {r.id: r.error for r in refs}
    assert errors["ok"] is None
    assert errors["nosource"].field == "source"
    assert any(e is not None and e.field == "id" and "duplicate" in str(e) for e in errors.values())
    assert errors["weird"].field == "colour" and "unknown manifest key" in str(errors["weird"])
    assert any(k.startswith("line") and "invalid JSON" in str(v) for k, v in errors.items() if v)
    problems = ds.validate()
    assert len(problems) == 5


def test_points_validation(builder):
    builder.add_simple("p1", source_points=[[1, 2]], target_points=[[3, 4], [5, 6]], point_layout="drag")
    builder.add_simple("p2", source_points=[[1, 2]], target_points=[[3, 4]])
    builder.add_simple("p3", source_points=[[1, 2]], point_layout="drag")
    with pytest.raises(SampleError, match="target_points"):
        _load(builder, "p1")
    with pytest.raises(SampleError, match="point_layout"):
        _load(builder, "p2")
    with pytest.raises(SampleError, match="together"):
        _load(builder, "p3")


def test_wrong_types(builder):
    builder.add_simple("t1", instruction=5)
    builder.add_simple("t2", turn=-1)
    with pytest.raises(SampleError, match="field 'instruction'"):
        _load(builder, "t1")
    with pytest.raises(SampleError, match="field 'turn'"):
        _load(builder, "t2")


def test_limit_shard_ids(builder):
    for i in range(6):
        builder.add_simple(f"s{i}")
    ds = lambda **kw: open_dataset({**builder.config(), **kw})  # noqa: E731
    assert [r.id for r in ds(limit=2).refs()] == ["s0", "s1"]
    # shard i of n: the ids whose sha1 (a big-endian integer) is i mod n, in the dataset's order
    assert [r.id for r in ds(shard="1/3").refs()] == [x for x in [f"s{i}" for i in range(6)] if int(hashlib.sha1(x.encode()).hexdigest(), 16) % 3 == 1]
    assert [r.id for r in ds(shard="1/3").refs()] == ["s1", "s2", "s4"]
    assert [r.id for r in ds(ids=["s5", "s2"]).refs()] == ["s2", "s5"]
    with pytest.raises(ValueError, match="shard"):
        ds(shard="3/3")
    with pytest.raises(KeyError, match="nope"):
        ds(ids=["nope"]).refs()


def test_embedded_sample_set_is_valid():
    ds = GenericDataset(REPO / "datasets" / "sample")
    refs = ds.refs()
    assert len(refs) >= 12
    assert ds.validate() == []
    cats = {r.category for r in refs}
    for c in ("add", "remove", "change_object", "change_color", "change_background", "move", "paste", "face_drag",
              "part"):
        assert c in cats, c
    faces = [ds.load(r) for r in refs if r.category == "face_drag"]
    assert len(faces) >= 2
    for s in faces:
        assert s.point_layout == "dlib68" and s.source_points.shape == (68, 2) and s.target_points.shape == (68, 2)
    for r in refs:
        s = ds.load(r)
        assert s.mask is not None and s.mask.any() and not s.mask.all(), r.id
        assert s.instruction and s.source_caption and s.target_caption, r.id
