"""A synthetic dataset in the generic format, for benchmarks (no repo data needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root: Path, n: int, size: int, category: str = "remove", name: str = "bench") -> dict:
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
        lines.append(json.dumps({
            "id": f"b{i:05d}", "source": f"images/{i:05d}.png", "instruction": "remove the disc",
            "source_caption": "a disc on a gradient", "target_caption": "a blue gradient",
            "mask": f"masks/{i:05d}.png", "category": category,
        }))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "card.yaml").write_text(f"name: {name}\nformat: generic\nversion: 1\n")
    return {"name": name, "format": "generic", "root": str(root)}
