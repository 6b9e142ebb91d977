"""Timing of single edits for the method benchmarks: one warm-up edit, then ``n`` timed edits
(CUDA synchronised before and after each, its peak memory reset per edit)."""
from __future__ import annotations

import resource
import time
from typing import Any, Iterator


def peak_gib(device: str) -> float:
    """Peak memory in GiB since the last reset (CUDA) or of the process (CPU: max RSS, Linux KiB)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_edits(method: Any, sample: Any, n: int, device: str) -> Iterator[tuple[int, Any, float, float, float]]:
    """``(i, output, prep_s, infer_s, peak_gib)`` for edits with seeds 0..n-1 after a warm-up edit
    (loading, kernels, caches). Preparation is the method's own ``prep_seconds``; inference the
    rest of the edit's wall time."""
    import torch

    method.edit(sample, 0)
    for i in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = method.edit(sample, i)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        prep = float(out.info["prep_seconds"])
        yield i, out, prep, total - prep, peak_gib(device)
