"""``identity``: returns the source unchanged. The no-edit baseline (upper bound on
preservation metrics, lower bound on edit metrics)."""
from __future__ import annotations

import dataclasses

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._common import source_of


@METHODS.register("identity")
class Identity(Method):
    version = "1"
    requires = ("source",)
    categories = None

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        return MethodOutput(image=source_of(sample).copy(), mask=None, info={})
