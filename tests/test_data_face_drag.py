"""The face-drag set builder (harness.data.face_drag): FFHQ-style alignment, dlib landmarks, the seeded
pairing, skips with reasons, the generic format, the FID reference cache, nothing written elsewhere.

Faces: skimage's astronaut and matplotlib's grace_hopper (offline), a mirrored and a shifted copy;
a faceless photo (skimage coffee) and a file that is no image are skipped."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.face_drag import (LOG_FILE, PROMPT, align_face, build_face_drag, face_quad, pair_cycle)

REPO = Path(__file__).resolve().parents[1]
SIZE = 256  # small aligned faces keep dlib fast; the default (512) is the paper's


def _faces() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    import skimage.data

    astronaut = skimage.data.astronaut()
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    shifted = np.zeros_like(hopper)
    shifted[:, 24:] = hopper[:, :-24]  # the face 24 px to the right, black strip on the left
    return {"astronaut.png": astronaut, "hopper.jpg": hopper, "sub/astronaut_mirror.png": astronaut[:, ::-1].copy(),
            "hopper_shifted.png": shifted}


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("celebahq")
    for rel, img in _faces().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.png")  # no face
    (root / "broken.png").write_bytes(b"not a png at all")  # unreadable
    (root / "notes.txt").write_text("not an image file: not a candidate")
    return root


@pytest.fixture(scope="module")
def built(face_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("face_drag")
    return build_face_drag(face_folder, out, num=800, seed=0, size=SIZE)


def test_alignment_geometry_by_hand():
    """face_quad: eyes at (100 +- 20, 100), mouth corners at (100 +- 15, 150): eye distance 40,
    eye-to-mouth 50 -> half side max(2 * 40, 1.8 * 50) = 90, centre (100, 105), axis-aligned.
    align_face maps the centre to the output centre and the half side to size / 2 px."""
    lm = np.zeros((68, 2))
    lm[36:42] = (80, 100)
    lm[42:48] = (120, 100)
    lm[48], lm[54] = (85, 150), (115, 150)
    quad, qsize = face_quad(lm)
    np.testing.assert_allclose(quad, [[10, 15], [10, 195], [190, 195], [190, 15]], atol=1e-12)
    assert qsize == pytest.approx(180.0)
    # a white 3x3 dot at the centre (100, 105) and one 45 px right of it (a quarter side)
    img = np.zeros((300, 300, 3), np.uint8)
    img[104:107, 99:102] = 255
    img[104:107, 144:147] = 255
    out = align_face(img, lm, 180)  # scale 1: a pure crop (half-pixel bilinear)
    assert out.shape == (180, 180, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[..., 0] > 100)
    left = xs < 120
    assert abs(xs[left].mean() - 90) <= 1 and abs(ys[left].mean() - 90) <= 1
    assert abs(xs[~left].mean() - 135) <= 1 and abs(ys[~left].mean() - 90) <= 1


def test_alignment_undoes_a_rotation():
    """The same landmarks rotated by 30 degrees about the centre, with the dots rotated too: the
    aligned image puts both dots back on the horizontal line through the centre."""
    a = math.radians(30)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array([150.0, 150.0])
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48], lm[48], lm[54] = (130, 145), (170, 145), (135, 195), (165, 195)
    lm = (lm - c) @ rot.T + c
    centre = (np.array([150.0, 150.0]) - c) @ rot.T + c  # eye mid (150,145) + 0.1 * 50 down
    right = (np.array([195.0, 150.0]) - c) @ rot.T + c
    img = np.zeros((300, 300, 3), np.uint8)
    for x, y in (centre, right):
        img[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = 255
    out = align_face(img, lm, 180)
    ys, xs = np.nonzero(out[..., 0] > 100)
    left = xs < 112
    assert abs(xs[left].mean() - 90) <= 1.5 and abs(ys[left].mean() - 90) <= 1.5
    assert abs(xs[~left].mean() - 135) <= 1.5 and abs(ys[~left].mean() - 90) <= 1.5


def test_pair_cycle():
    assert pair_cycle(2) == [1, 0] and pair_cycle(4) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="at least 2"):
        pair_cycle(1)


def test_faces_are_aligned_with_68_points_and_bad_images_skipped(built, face_folder):
    assert len(built.records) == 4
    assert {r["meta"]["source_file"] for r in built.records} == set(_faces())
    for r in built.records:
        img = np.asarray(Image.open(built.out / r["source"]))
        assert img.shape == (SIZE, SIZE, 3)
        src, tgt = np.asarray(r["source_points"]), np.asarray(r["target_points"])
        assert src.shape == (68, 2) and tgt.shape == (68, 2)
        assert (src >= 0).all() and (src < SIZE).all() and (tgt >= 0).all() and (tgt < SIZE).all()
        assert r["category"] == "face_drag" and r["point_layout"] == "dlib68"
        assert r["source_caption"] == r["target_caption"] == PROMPT == "a photo of a human face"
        # the no-edit distances of the meta are the metric's formula on the stored points
        d = np.sum((src - tgt).astype(float) ** 2, axis=1)
        assert r["meta"]["noedit_mse_68pt"] == pytest.approx(d.mean())
        assert r["meta"]["noedit_mse_17pt"] == pytest.approx(d[:17].mean())
    # aligned faces: the eyes sit where the FFHQ square puts them (the same height, near 0.4 * size)
    for r in built.records:
        src = np.asarray(r["source_points"], float)
        eye_l, eye_r = src[36:42].mean(0), src[42:48].mean(0)
        assert abs(eye_l[1] - eye_r[1]) < 0.03 * SIZE
        assert 0.3 * SIZE < (eye_l[1] + eye_r[1]) / 2 < 0.5 * SIZE
    log = [json.loads(line) for line in (built.out / LOG_FILE).read_text().splitlines()]
    reasons = {e["file"]: e["reason"] for e in log}
    assert set(reasons) == {"coffee.png", "broken.png"}  # notes.txt is not a candidate
    assert reasons["coffee.png"].startswith("no face detected")
    assert reasons["broken.png"].startswith("unreadable image")
    assert built.card["built_with"]["skipped"] == 2 and built.card["built_with"]["files"] == 6


def test_pairing_is_a_seeded_cycle(built, face_folder, tmp_path):
    ids = [r["id"] for r in built.records]
    refs = [r["meta"]["reference_id"] for r in built.records]
    assert sorted(refs) == sorted(ids) and all(a != b for a, b in zip(ids, refs))
    assert refs == ids[1:] + ids[:1]  # each takes the next face of the seeded order
    by_id = {r["id"]: r for r in built.records}
    for r in built.records:  # the targets are the reference's own landmarks
        assert r["target_points"] == by_id[r["meta"]["reference_id"]]["source_points"]
        assert r["meta"]["seed"] == 0
    # the same seed gives the same set, byte for byte; another seed another order
    again = build_face_drag(face_folder, tmp_path / "again", num=800, seed=0, size=SIZE)
    assert (tmp_path / "again" / "manifest.jsonl").read_bytes() == (built.out / "manifest.jsonl").read_bytes()
    orders = {tuple(r["id"] for r in build_face_drag(face_folder, tmp_path / f"s{s}", num=800, seed=s,
                                                      size=SIZE).records) for s in (1, 2, 3)}
    assert len(orders | {tuple(ids)}) > 1
    assert again.card["built_with"]["seed"] == 0


def test_num_limits_the_faces_and_too_few_faces_is_a_clear_error(face_folder, tmp_path):
    b = build_face_drag(face_folder, tmp_path / "two", num=2, seed=0, size=SIZE)
    assert len(b.records) == 2 and [r["meta"]["reference_id"] for r in b.records] == [b.records[1]["id"],
                                                                                        b.records[0]["id"]]
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.fromarray(_faces()["astronaut.png"]).save(lone / "a.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(lone / "b.png")
    with pytest.raises(ValueError, match=r"1 usable face\(s\) among 2 image file\(s\).*needs at least 2"):
        build_face_drag(lone, tmp_path / "lone_out", size=SIZE)
    assert "no face detected" in (tmp_path / "lone_out" / LOG_FILE).read_text()


def test_the_set_loads_with_the_generic_loader(built):
    from harness.data import GenericDataset, open_dataset

    ds = GenericDataset(built.out)
    assert ds.name == "face_drag" and ds.validate() == []
    for ref in ds.refs():
        s = ds.load(ref)
        assert s.category == "face_drag" and s.point_layout == "dlib68"
        assert s.source_points.shape == (68, 2) and s.target_points.shape == (68, 2)
        assert s.mask is not None and s.mask.any() and not s.mask.all()
        # the mask holds every source and target point
        for x, y in np.concatenate([s.source_points, s.target_points]).astype(int):
            assert s.mask[y, x]
    # the dataset config of the repository opens it with dataset.root and ids=null
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "dataset" / "face_drag.yaml").read_text())
    cfg.update(root=str(built.out))
    assert len(open_dataset(cfg).refs()) == 4


def test_landmark_metric_scores_an_identity_edit_at_the_noedit_distance(built):
    """The stored source points are what landmark_mse detects on the image: an unedited face scores
    exactly the no-edit distance, 68 and 17 points."""
    from harness.data import GenericDataset
    from harness.metrics.base import ScoringItem
    from harness.metrics.landmarks import LandmarkMSE

    ds = GenericDataset(built.out)
    m = LandmarkMSE()
    s = ds.load(ds.refs()[0])
    rows = {(v.metric, v.region): v.value for v in m.score_item(ScoringItem(sample=s, edit=s.source))}
    assert rows[("landmark_mse", "68pt")] == pytest.approx(s.meta["noedit_mse_68pt"])
    assert rows[("landmark_mse", "17pt")] == pytest.approx(s.meta["noedit_mse_17pt"])
    assert rows[("landmark_mse_noedit", "68pt")] == pytest.approx(s.meta["noedit_mse_68pt"])


def test_fid_reference_statistics_are_cached_where_the_fid_metric_reads_them(face_folder, tmp_path, monkeypatch):
    """--fid-reference aligned: the harness's FID computes the aligned faces' statistics once into
    its cache; an fid metric pointed at that folder finds the same file (no recomputation), and
    nothing is written outside the output folder and the cache."""
    from harness.metrics.fid import FID

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p: p.stat().st_mtime_ns for p in face_folder.rglob("*")}
    out, cache = tmp_path / "out", tmp_path / "fidcache"
    b = build_face_drag(face_folder, out, num=2, seed=0, size=SIZE, fid_reference="aligned",
                        fid_cache_dir=str(cache), fid_random_weights=True)
    fid = b.card["fid_reference"]
    assert fid["computed"] and fid["images"] == 2 and not fid["cached_before"]
    assert (cache / fid["stats_file"]).is_file()
    metric = FID(reference_dir=str(out / "images"), stats_cache_dir=str(cache), allow_random_weights=True)
    assert f"ref-{metric.reference_key()}.npz" == fid["stats_file"]
    calls = []
    metric.extract = lambda images: calls.append(len(images))  # must not run: the cache answers
    assert metric.reference_dir_stats().n == 2 and calls == []
    # nothing else written: the input untouched, the working directory empty
    assert {p: p.stat().st_mtime_ns for p in face_folder.rglob("*")} == before
    assert list(work.iterdir()) == []
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"out", "fidcache"}
    assert "metrics.items.fid.reference_dir=" in fid["use"]


def test_unavailable_fid_weights_are_noted_not_fatal(face_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch_home"))
    b = build_face_drag(face_folder, tmp_path / "out", num=2, seed=0, size=SIZE, fid_reference="input",
                        fid_cache_dir=str(tmp_path / "cache"), fid_weights_path=str(tmp_path / "missing.pth"))
    assert b.card["fid_reference"]["computed"] is False and "missing.pth" in b.card["fid_reference"]["reason"]
    assert len(b.records) == 2


def test_command_line(face_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_ = subprocess.run([sys.executable, "-m", "harness.data.face_drag", "--help"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert help_.returncode == 0 and "--num" in help_.stdout and "CelebA" in help_.stdout
    ok = subprocess.run([sys.executable, "-m", "harness.data.face_drag", str(face_folder), "--out",
                         str(tmp_path / "o"), "--num", "2", "--size", str(SIZE)], capture_output=True, text=True,
                        env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 2 face-drag sample(s)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "harness.data.face_drag", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "o2")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "images folder not found" in bad.stderr
    assert not (tmp_path / "o2").exists()
