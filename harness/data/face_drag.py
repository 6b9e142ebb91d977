"""The face-drag set of DiffEditor's Table 1 (and DragonDiffusion's face benchmark), built from a
folder of CelebA-HQ images: :func:`build_face_drag`, ``python -m harness.data.face_drag``.

What the papers say (DiffEditor, Mou et al., CVPR 2024, sec. 4.2; the same test set as
DragonDiffusion): "800 aligned faces from the CelebA-HQ training set", dragged with 17 and with 68
landmarks; accuracy = MSE between the landmarks detected on the edit and the target landmarks;
FID between the edits and the CelebA-HQ training set. The image list, the pairing and the 17-point
subset were not released. The official face task (``src/demo/model.py:run_drag_face`` in
MC-E/DragonDiffusion) aligns a source face and a reference face with dlib (FFHQ-style alignment, to
1024 px), detects 68 landmarks on both aligned faces, drags the source's landmarks onto the
reference's, with the prompt "a photo of a human face".

What this builder does (each choice a parameter, recorded in the card):

1. Candidates: every image file under ``images`` (recursive, sorted by relative path), visited in a
   seeded random order (``numpy.random.default_rng(seed).permutation``) until ``num`` usable faces
   are found (default 800, the paper's count). Pairing seed, order and count go into the card.
2. Alignment (:func:`align_face`): the FFHQ recipe the official code uses, written here: an oriented
   square from the eye centres and the mouth corners of the dlib landmarks (side = max(2 x eye
   distance, 1.8 x eye-to-mouth distance) x 2, centre = eye midpoint + 0.1 x eye-to-mouth), the image
   pre-shrunk when the square is more than twice the output, cropped with a 10% border, padded by
   reflection where the square leaves the image (the padding blurred and faded to the median colour,
   as FFHQ), then resampled to ``size`` x ``size`` with PIL's bilinear quad transform. ``size``
   defaults to 512: the paper's editing and timing resolution ("image resolution being 512 x 512");
   the official demo aligns to 1024 and resizes to its working resolution afterwards (pass
   ``--size 1024`` for that).
3. Landmarks: dlib's frontal face detector (upsample 1, the largest face; the official
   ``get_landmark`` keeps the last detection) and the 68-point predictor that
   :mod:`harness.metrics.landmarks` resolves (``--predictor``, ``EDIT_HARNESS_DLIB_PREDICTOR``,
   ``face_recognition_models``, Debian's libdlib-data), on the original image (for the alignment)
   and again on the aligned image (the stored source points), exactly as the metric detects them
   on an edit.
4. Pairing (the papers do not describe it; ``pairing: cycle``): the usable faces, in the seeded
   order, each paired with the next one (the last with the first), so no face is its own
   reference and every face is a reference once. The reference's landmarks on its aligned image
   are the sample's ``target_points``.
5. Samples (the generic format, :mod:`harness.data.generic`): ``images/<id>.png`` (the aligned
   face), ``masks/<id>.png`` (the convex hull of the 68 source and 68 target points dilated by
   15 px per 512, as the embedded set's face samples), ``category: face_drag``, ``point_layout:
   dlib68``, 68 ``source_points`` and ``target_points``, the prompt "a photo of a human face" as
   both captions, and ``meta`` (original file, reference id and file, the no-edit distances over
   68 and 17 points, the seed). The 17-point subset is the jaw line, indices 0-16, as the metric
   (``landmark_mse`` region ``17pt``; DiffEditor names no indices).
6. Bad images (unreadable, no face on the original or on the aligned image, fewer than 68 points)
   are skipped, each with its reason in ``build_log.jsonl``; nothing stops the build.
7. FID reference statistics (optional, ``--fid-reference``): ``input`` = the whole CelebA-HQ folder
   given (the paper's reference: the training set), ``aligned`` = the aligned faces written here,
   ``none``. They are computed once through the harness's own FID code
   (:class:`harness.metrics.fid.FID`, ``reference_dir`` + ``stats_cache_dir``), i.e. the very cache
   file a later ``fid`` metric with ``reference_dir=<that folder>`` loads instead of recomputing.
   Unavailable Inception weights are logged, not fatal.

Files are written only under ``out`` (and the FID cache folder when asked); ``images`` is only read.
CelebA-HQ is not shipped: see :data:`HOW_TO_OBTAIN`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __name__ == "__main__":
    from harness.data.face_drag import main as _main

    sys.exit(_main())

PROMPT = "a photo of a human face"  # src/demo/model.py:run_drag_face
INSTRUCTION = "Move the face's landmarks onto the reference face's landmarks"
DEFAULT_NUM = 800  # DiffEditor sec. 4.2 / DragonDiffusion: 800 aligned CelebA-HQ faces
DEFAULT_SIZE = 512  # DiffEditor sec. 4.2: 512 x 512
DEFAULT_SEED = 0
PAIRINGS = ("cycle",)
FID_REFERENCES = ("input", "aligned", "none")
SUBSET_17 = tuple(range(17))  # jaw line, as harness.metrics.landmarks.POINT_SETS["17pt"]
MASK_DILATION_PER_512 = 15
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LOG_FILE = "build_log.jsonl"

LICENSE = (
    "CelebA-HQ (Karras et al., ICLR 2018) is derived from CelebA (Liu et al., ICCV 2015), whose "
    "agreement allows non-commercial research and educational use only and forbids redistribution "
    "of the images; the aligned faces written here are derived images under the same terms. Do not "
    "redistribute them. The landmark annotations come from dlib's 68-point predictor (iBUG 300-W "
    "training data, its own terms)."
)
HOW_TO_OBTAIN = (
    "The harness never downloads data. Obtain CelebA-HQ under the CelebA agreement (CelebA page "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, 'CelebA-HQ' link; or recreate it from CelebA "
    "with the scripts of https://github.com/tkarras/progressive_growing_of_gans), put its images in one "
    "folder (e.g. data/celebahq/), then build the set once: python -m harness.data.face_drag "
    "data/celebahq --out data/face_drag [--num 800 --seed 0 --size 512 --fid-reference input]; check it "
    "with edit-harness validate data/face_drag and run experiment=diffeditor_table1 dataset=face_drag "
    "dataset.root=data/face_drag 'dataset.ids=null'."
)


class FaceNotFound(Exception):
    """No usable face (no detection, or not 68 points) in an image."""


@dataclasses.dataclass
class Face:
    """One usable candidate: its file, the aligned image and the 68 landmarks detected on it."""

    id: str
    file: str  # relative to the input folder
    aligned: np.ndarray
    points: np.ndarray  # 68 x 2, on ``aligned``


@dataclasses.dataclass
class FaceDragBuild:
    out: Path
    records: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    card: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------
def face_quad(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ oriented square (4 x 2 corners, clockwise from top-left) of 68 dlib landmarks and its
    side length. Eye centres: means of points 36-41 and 42-47; mouth corners: 48 and 54."""
    lm = np.asarray(points, dtype=np.float64)
    eye_l, eye_r = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eye_mid = (eye_l + eye_r) / 2
    eye_vec = eye_r - eye_l
    mouth_mid = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_mid - eye_mid
    # the square's x axis: the eye direction corrected by the eye-to-mouth normal
    axis = eye_vec - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    axis /= np.hypot(*axis)
    axis *= max(np.hypot(*eye_vec) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    perp = np.array([-axis[1], axis[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - axis - perp, centre - axis + perp, centre + axis + perp, centre + axis - perp])
    return quad, float(np.hypot(*axis) * 2)


def align_face(image: np.ndarray, points: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The face of an RGB uint8 image aligned FFHQ-style (see the module doc) to size x size."""
    from PIL import Image
    from scipy import ndimage

    img = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
    quad, qsize = face_quad(points)
    # shrink first when the square is much larger than the output (less aliasing in the transform)
    shrink = int(math.floor(qsize / size * 0.5))
    if shrink > 1:
        img = img.resize((int(round(img.size[0] / shrink)), int(round(img.size[1] / shrink))), Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink
    # crop to the square's bounding box plus a border
    border = max(int(round(qsize * 0.1)), 3)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(x0 - border, 0), max(y0 - border, 0), min(x1 + border, img.size[0]), min(y1 + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad = quad - np.array(crop[:2], dtype=np.float64)
    # pad by reflection where the square leaves the image; blur and fade the padding (FFHQ)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
    pad = [max(-x0 + border, 0), max(-y0 + border, 0), max(x1 - img.size[0] + border, 0),
           max(y1 - img.size[1] + border, 0)]  # left, top, right, bottom
    if max(pad) > border - 4:
        pad = [max(p, int(round(qsize * 0.3))) for p in pad]
        arr = np.pad(np.asarray(img, dtype=np.float32), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
        h, w = arr.shape[:2]
        yy, xx = np.ogrid[:h, :w]
        xx, yy = xx.astype(np.float32), yy.astype(np.float32)
        # 0 inside the original image, rising to 1 at the outer edge of the padding
        fade = np.maximum(1.0 - np.minimum(xx / max(pad[0], 1), (w - 1 - xx) / max(pad[2], 1)),
                          1.0 - np.minimum(yy / max(pad[1], 1), (h - 1 - yy) / max(pad[3], 1)))[..., None]
        sigma = qsize * 0.02
        arr += (ndimage.gaussian_filter(arr, [sigma, sigma, 0]) - arr) * np.clip(fade * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(fade, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad = quad + np.array(pad[:2], dtype=np.float64)
    out = img.transform((size, size), Image.QUAD, tuple((quad + 0.5).flatten()), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def hull_mask(points: np.ndarray, size: int, radius: int) -> np.ndarray:
    """Convex hull of the points, filled and dilated by ``radius`` px (bool size x size)."""
    import cv2

    hull = cv2.convexHull(np.round(np.asarray(points, np.float64)).astype(np.int32))
    m = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(m, hull, 1)
    if radius > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    return m.astype(bool)


# ----------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------
def _sample_id(rel: str) -> str:
    stem = Path(rel).with_suffix("").as_posix()
    return "face_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.")


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def prepare_face(path: Path, rel: str, predictor: Path, size: int) -> Face:
    """Detect, align and re-detect one image; :class:`FaceNotFound` with the reason otherwise."""
    from ..metrics.landmarks import detect_landmarks

    try:
        img = _load_rgb(path)
    except Exception as e:  # any unreadable file is a skip, never a crash
        raise FaceNotFound(f"unreadable image: {type(e).__name__}: {e}") from None
    lm = detect_landmarks(img, predictor)
    if lm is None:
        raise FaceNotFound("no face detected (dlib frontal face detector, upsample 1)")
    if lm.shape != (68, 2):
        raise FaceNotFound(f"the predictor gave {lm.shape[0]} points, not 68")
    aligned = align_face(img, lm, size)
    pts = detect_landmarks(aligned, predictor)
    if pts is None:
        raise FaceNotFound("no face detected on the aligned image")
    if pts.shape != (68, 2):
        raise FaceNotFound(f"the predictor gave {pts.shape[0]} points on the aligned image, not 68")
    return Face(_sample_id(rel), rel, aligned, pts)


def pair_cycle(n: int) -> list[int]:
    """Reference index of each of n faces: the next one in the (seeded) order, the last -> the first."""
    if n < 2:
        raise ValueError(f"pairing needs at least 2 usable faces, found {n}")
    return [(i + 1) % n for i in range(n)]


def _mse(a: np.ndarray, b: np.ndarray, idx: Sequence[int]) -> float:
    d = np.asarray(a, np.float64)[list(idx)] - np.asarray(b, np.float64)[list(idx)]
    return float(np.mean(np.sum(d * d, axis=1)))


def fid_reference_stats(folder: Path, cache_dir: Path, *, random_weights: bool = False,
                        weights_path: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Compute (or find) the FID reference statistics of ``folder`` in the harness's FID cache, with
    the ``fid`` metric's own code; what was done, for the card."""
    from ..metrics.fid import FID

    fid = FID(reference_dir=str(folder), stats_cache_dir=str(cache_dir), allow_random_weights=random_weights,
              weights_path=weights_path, device=device)
    why = fid.available()
    if why is not None:
        return {"computed": False, "reason": why}
    key = fid.reference_key()
    path = cache_dir / f"ref-{key}.npz"
    cached = path.is_file()
    stats = fid.reference_dir_stats()
    return {"computed": True, "cached_before": cached, "images": int(stats.n), "stats_file": path.name,
            "extractor": fid.feature_key(), "weights": fid.weights()}


def build_face_drag(images: str | Path, out: str | Path, *, num: int = DEFAULT_NUM, seed: int = DEFAULT_SEED,
                    size: int = DEFAULT_SIZE, pairing: str = "cycle", predictor: str | None = None,
                    name: str = "face_drag", fid_reference: str = "none", fid_cache_dir: str | None = None,
                    fid_random_weights: bool = False, fid_weights_path: str | None = None,
                    progress: bool = False) -> FaceDragBuild:
    """Build the face-drag set from the images under ``images`` into ``out`` (see the module doc)."""
    from ..fileio import save_bytes
    from ..images import save_png
    from ..metrics.landmarks import resolve_predictor

    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"face_drag: images folder not found: {images}")
    if pairing not in PAIRINGS:
        raise ValueError(f"face_drag: pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if fid_reference not in FID_REFERENCES:
        raise ValueError(f"face_drag: fid_reference must be one of {', '.join(FID_REFERENCES)}, got {fid_reference!r}")
    if int(num) < 2:
        raise ValueError(f"face_drag: num must be at least 2 (a face needs another as its reference), got {num}")
    if int(size) < 64:
        raise ValueError(f"face_drag: size must be at least 64 px, got {size}")
    pred = resolve_predictor(predictor)
    if isinstance(pred, str):
        raise FileNotFoundError(pred.replace("landmark_mse:", "face_drag:", 1))
    real_out = out.resolve()
    files = [f for f in list_images(images) if not (images / f).resolve().is_relative_to(real_out)]
    if not files:
        raise ValueError(f"face_drag: no image files ({', '.join(IMAGE_EXTS)}) under {images}")
    order = [files[i] for i in np.random.default_rng(int(seed)).permutation(len(files))]

    faces: list[Face] = []
    skipped: list[dict[str, Any]] = []
    seen: set[str] = set()
    for k, rel in enumerate(order):
        if len(faces) >= num:
            break
        sid = _sample_id(rel)
        if sid in seen:
            skipped.append({"file": rel, "reason": f"its id {sid!r} repeats an earlier file's"})
            continue
        try:
            face = prepare_face(images / rel, rel, pred, int(size))
        except FaceNotFound as e:
            skipped.append({"file": rel, "reason": str(e)})
            continue
        seen.add(sid)
        faces.append(face)
        if progress:
            print(f"\rface_drag: {len(faces)}/{num} faces ({k + 1} files read)", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if len(faces) < 2:
        log = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
        save_bytes(out / LOG_FILE, log.encode("utf-8"))
        raise ValueError(f"face_drag: {len(faces)} usable face(s) among {len(files)} image file(s) under {images}; "
                         f"pairing needs at least 2 (each skipped file's reason: {out / LOG_FILE})")
    refs = pair_cycle(len(faces))

    radius = int(round(MASK_DILATION_PER_512 * size / 512))
    records = []
    for i, face in enumerate(faces):
        ref = faces[refs[i]]
        src_pts = np.rint(face.points).astype(int)
        tgt_pts = np.rint(ref.points).astype(int)
        save_png(out / "images" / f"{face.id}.png", face.aligned)
        save_png(out / "masks" / f"{face.id}.png", hull_mask(np.concatenate([src_pts, tgt_pts]), size, radius))
        records.append({
            "id": face.id,
            "source": f"images/{face.id}.png",
            "instruction": INSTRUCTION,
            "source_caption": PROMPT,
            "target_caption": PROMPT,
            "mask": f"masks/{face.id}.png",
            "category": "face_drag",
            "source_points": src_pts.tolist(),
            "target_points": tgt_pts.tolist(),
            "point_layout": "dlib68",
            "meta": {
                "source_file": face.file,
                "reference_id": ref.id,
                "reference_file": ref.file,
                "pairing": pairing,
                "seed": int(seed),
                "noedit_mse_68pt": _mse(src_pts, tgt_pts, range(68)),
                "noedit_mse_17pt": _mse(src_pts, tgt_pts, SUBSET_17),
                "mask": f"convex hull of the 68 source and 68 target points, dilated {radius} px",
            },
        })
    log = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
    save_bytes(out / LOG_FILE, log.encode("utf-8"))

    fid: dict[str, Any] = {"reference": fid_reference}
    if fid_reference != "none":
        folder = images if fid_reference == "input" else out / "images"
        cache = Path(os.path.expanduser(fid_cache_dir or "~/.cache/edit-harness/fid"))
        fid.update(folder=str(folder), stats_cache_dir=str(cache))
        fid.update(fid_reference_stats(folder, cache, random_weights=fid_random_weights,
                                       weights_path=fid_weights_path))
        fid["use"] = f"metrics.items.fid.reference_dir={folder} metrics.items.fid.stats_cache_dir={cache}"
    n68 = [r["meta"]["noedit_mse_68pt"] for r in records]
    n17 = [r["meta"]["noedit_mse_17pt"] for r in records]
    card = {
        "name": name,
        "format": "generic",
        "manifest": "manifest.jsonl",
        "version": 1,
        "description": (
            f"Face-drag set of DiffEditor Table 1 / DragonDiffusion: {len(records)} CelebA-HQ faces aligned to "
            f"{size} x {size}, each dragged onto the 68 dlib landmarks of another face of the set (built by "
            "harness.data.face_drag)"),
        "license": LICENSE,
        "how_to_obtain": HOW_TO_OBTAIN,
        "built_with": {
            "images_folder": str(images), "files": len(files), "faces": len(records), "skipped": len(skipped),
            "num": int(num), "seed": int(seed), "order": "numpy.random.default_rng(seed).permutation of the sorted "
            "relative paths, read until num faces are usable", "size": int(size), "pairing": pairing,
            "pairing_rule": "each face in the seeded order takes the next as its reference (the last the first)",
            "predictor": str(pred),
            "alignment": "FFHQ recipe (harness.data.face_drag.align_face), as src/utils/alignment.py of "
                         "MC-E/DragonDiffusion",
            "log": LOG_FILE,
        },
        "categories": {"face_drag": len(records)} if records else {},
        "point_layout": "dlib68",
        "point_subsets": {"68pt": "all 68 dlib points", "17pt": "jaw line, indices 0-16 (landmark_mse region 17pt)"},
        "prompt": PROMPT,
        "noedit_mse": {"68pt": float(np.mean(n68)) if n68 else None, "17pt": float(np.mean(n17)) if n17 else None,
                       "paper": {"68pt": 36.36, "17pt": 57.19}},
        "fid_reference": fid,
    }
    import yaml

    manifest = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    save_bytes(out / "manifest.jsonl", manifest.encode("utf-8"))
    save_bytes(out / "card.yaml", ("# Generated by harness.data.face_drag; do not edit by hand.\n" + yaml.safe_dump(
        card, sort_keys=False, allow_unicode=True, width=100)).encode("utf-8"))
    return FaceDragBuild(out, records, skipped, card)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.data.face_drag IMAGES --out DIR``: exit 0 when the set was written (skipped
    images are listed in DIR/build_log.jsonl and counted on stdout), 2 when it could not be built."""
    ap = argparse.ArgumentParser(
        prog="python -m harness.data.face_drag",
        description="Build DiffEditor's face-drag set (Table 1) from a folder of CelebA-HQ images: dlib "
                    "alignment, 68 landmarks, each face paired with a reference face whose landmarks are the "
                    "targets; written in the generic format.",
        epilog=HOW_TO_OBTAIN)
    ap.add_argument("images", help="folder of face images (CelebA-HQ), read recursively")
    ap.add_argument("--out", required=True, help="the dataset folder to write (dataset.root)")
    ap.add_argument("--num", type=int, default=DEFAULT_NUM, help=f"faces to keep (default {DEFAULT_NUM}, the paper's)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the visiting order and so of the pairing")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE,
                    help=f"aligned face size in px (default {DEFAULT_SIZE}, the paper's; the official demo aligns to 1024)")
    ap.add_argument("--pairing", choices=PAIRINGS, default="cycle", help="pairing rule (see the module doc)")
    ap.add_argument("--predictor", default=None, help="dlib 68-point predictor file (default: as landmark_mse)")
    ap.add_argument("--name", default="face_drag", help="the dataset's name in tables")
    ap.add_argument("--fid-reference", choices=FID_REFERENCES, default="none",
                    help="cache FID reference statistics of the input folder (the paper's CelebA-HQ reference) or "
                         "of the aligned faces (default none)")
    ap.add_argument("--fid-cache-dir", default=None, help="FID statistics cache (default ~/.cache/edit-harness/fid)")
    ap.add_argument("--fid-weights", default=None, help="Inception weights file (default: as the fid metric)")
    ap.add_argument("--fid-random-weights", action="store_true", help="random Inception weights (smoke runs only)")
    a = ap.parse_args(argv)
    try:
        b = build_face_drag(a.images, a.out, num=a.num, seed=a.seed, size=a.size, pairing=a.pairing,
                            predictor=a.predictor, name=a.name, fid_reference=a.fid_reference,
                            fid_cache_dir=a.fid_cache_dir, fid_random_weights=a.fid_random_weights,
                            fid_weights_path=a.fid_weights, progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:
        print(f"face_drag: {e}" if not str(e).startswith("face_drag") else str(e), file=sys.stderr)
        return 2
    fid = b.card["fid_reference"]
    print(f"wrote {len(b.records)} face-drag sample(s) to {b.out}; {len(b.skipped)} image(s) skipped "
          f"(reasons in {b.out / LOG_FILE})")
    if fid.get("reference") != "none":
        print(f"FID reference statistics: " + (f"{fid['images']} images, {fid['stats_file']} in {fid['stats_cache_dir']}"
                                               if fid.get("computed") else f"not computed: {fid['reason']}"))
    if len(b.records) < a.num:
        print(f"note: {len(b.records)} usable faces, fewer than --num {a.num}", file=sys.stderr)
    return 0
