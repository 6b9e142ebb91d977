"""A synthetic dataset in the generic format, for benchmarks (no repo data needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root: Path, n: int, size: int, category: str = "remove", name: str = "bench",
                 reference: bool = False) -> dict:
    """n synthetic samples (a gradient with a disc, its mask, captions); with ``reference`` each
    also names a reference image (the disc's crop), for exemplar-based methods."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    lines = []
    for i in range(n):
        base = np.stack([x, y, (x + y) // 2], -1).astype(np.float64) * 255 / size
        img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, size / 6
        mask = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r).astype(np.uint8) * 255
        Image.fromarray(img).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")
        rec = {
            "id": f"b{i:05d}", "source": f"images/{i:05d}.png", "instruction": "remove the disc",
            "source_caption": "a disc on a gradient", "target_caption": "a blue gradient",
            "mask": f"masks/{i:05d}.png", "category": category,
        }
        if reference:
            y0, x0 = int(max(cy - r, 0)), int(max(cx - r, 0))
            Image.fromarray(img[y0:int(cy + r), x0:int(cx + r)]).save(root / "images" / f"{i:05d}_ref.png")
            rec["reference"] = f"images/{i:05d}_ref.png"
        lines.append(json.dumps(rec))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "card.yaml").write_text(f"name: {name}\nformat: generic\nversion: 1\n")
    return {"name": name, "format": "generic", "root": str(root)}
