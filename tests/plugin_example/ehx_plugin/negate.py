"""``ehx_negate``: the photographic negative of the source, blended by ``strength``."""
from __future__ import annotations

import dataclasses

import numpy as np

from harness.method import Method
from harness.types import MethodOutput, Sample


class Negate(Method):
    """Registered by its entry point (``ehx_negate = "ehx_plugin.negate:Negate"``), no decorator."""

    version = "1"
    requires = ("source",)
    categories = None

    @dataclasses.dataclass(frozen=True)
    class Params:
        strength: float = 1.0  # 0 returns the source, 1 its negative

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        src = sample.source.astype(np.float64)
        s = self.params.strength
        out = np.rint((1.0 - s) * src + s * (255.0 - src))
        return MethodOutput(image=out.astype(np.uint8), mask=None, info={"strength": s})
