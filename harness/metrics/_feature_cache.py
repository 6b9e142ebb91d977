"""A per-process, byte-bounded cache of method-independent features (reference images' network
activations), shared by the metrics that keep large per-image tensors (DINO keys, LPIPS layers).

Admission, not eviction: once the budget is full, new entries are simply not kept. A sweep scores
the dataset in the same order for every method, so a least-recently-used cache smaller than the
dataset would evict each entry just before the next method asks for it (no hits at all); keeping
the first entries that fit gives every later method those hits. Values are numpy arrays or
sequences of numpy arrays / torch tensors, never modified once stored. :func:`image_hash` is the
content key every feature cache of the metrics uses (also the CLIP embedding cache, on disk).
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np


def image_hash(img: np.ndarray, mask: np.ndarray | None = None) -> str:
    """sha1 of the image bytes (with shape and dtype), and of the region mask when one applies."""
    a = np.ascontiguousarray(img)
    h = hashlib.sha1(f"{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
    if mask is not None:
        h.update(b"|mask|")
        h.update(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes())
    return h.hexdigest()


def nbytes(value: Any) -> int:
    """Bytes held by an array, a tensor, or a list/tuple of them."""
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return int(value.numel() * value.element_size())  # torch.Tensor


class FeatureCache:
    """Entries keyed by a tuple (model key, kind, content sha1), within ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._mem: dict[tuple, Any] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            return self._mem.get(key)

    def put(self, key: tuple, value: Any) -> bool:
        """Keep ``value`` if it fits in what is left of the budget; True if kept."""
        size = nbytes(value)
        with self._lock:
            if key in self._mem:
                return True
            if self._bytes + size > self.max_bytes:
                return False
            self._mem[key] = value
            self._bytes += size
            return True

    def grow(self, max_bytes: int) -> None:
        """Raise the budget to at least ``max_bytes`` (several metrics share one cache)."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, int(max_bytes))

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)
