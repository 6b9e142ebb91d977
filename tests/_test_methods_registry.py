"""Methods registered only by the tests: slow, failing, misbehaving and pixel-shifting adapters."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from harness.method import Method
from harness.registry import METHODS
from harness.types import MethodOutput


@METHODS.register("test_slow")
class SlowIdentity(Method):
    """Identity that sleeps, so a subprocess can be killed mid-sweep."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        sleep: float = 0.2

    def edit(self, sample, seed):
        time.sleep(self.params.sleep)
        return MethodOutput(image=sample.source.copy(), info={"prep_seconds": 0.0})


@METHODS.register("test_flaky")
class Flaky(Method):
    """Fails on sample ids listed in the env var TEST_FLAKY_IDS; counts its calls in a file."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def edit(self, sample, seed):
        counter = os.environ.get("TEST_FLAKY_COUNTER")
        if counter:
            with open(counter, "a") as f:
                f.write(sample.id + "\n")
        if sample.id in os.environ.get("TEST_FLAKY_IDS", "").split(","):
            raise RuntimeError(f"boom on {sample.id}")
        return MethodOutput(image=sample.source.copy())


@METHODS.register("test_shift")
class Shift(Method):
    """Adds ``step`` to every channel of every pixel, modulo 256: each edit changes the whole
    image, and the image a turn was given is read back exactly from its edit (multi-turn chaining:
    after k self-fed turns the edit is the session's input shifted by k * step)."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        step: int = 17

    def edit(self, sample, seed):
        img = ((sample.source.astype(np.uint16) + self.params.step) % 256).astype(np.uint8)
        return MethodOutput(image=img, info={"source_from": sample.meta.get("source_from")})


@METHODS.register("test_bad_output")
class BadOutput(Method):
    """Returns a NaN float image, an all-black image or a wrong shape, by sample id suffix."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def edit(self, sample, seed):
        h, w = sample.source.shape[:2]
        if sample.id.endswith("nan"):
            img = np.full((h, w, 3), np.nan, np.float32)
            return MethodOutput(image=img)
        if sample.id.endswith("black"):
            return MethodOutput(image=np.zeros((h, w, 3), np.uint8))
        if sample.id.endswith("gray"):
            return MethodOutput(image=np.zeros((h, w), np.uint8))
        if sample.id.endswith("small"):
            return MethodOutput(image=sample.source[: h // 2, : w // 2].copy())
        return MethodOutput(image=sample.source.copy())


@METHODS.register("test_unprepared")
class NeedsWeights(Method):
    """A method whose weights are missing: prepare raises."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def prepare(self):
        raise FileNotFoundError("weights 'org/model' not found in the hub cache; pass model=<local path>")

    def edit(self, sample, seed):  # pragma: no cover - never reached
        return MethodOutput(image=sample.source.copy())


# -- a set metric for the runner's set-scoring path --------------------------------------------
from harness.metrics.base import SetMetric  # noqa: E402
from harness.registry import METRICS  # noqa: E402
from harness.types import ScoreValue  # noqa: E402

SET_CALLS: list[int] = []


@METRICS.register("test_set_mean")
class SetMean(SetMetric):
    """Mean pixel value over all edits of a job; records each batch size it was fed."""

    higher_is_better = True

    def reset(self):
        super().reset()
        self._sum, self._n = 0.0, 0

    def update(self, items):
        SET_CALLS.append(len(items))
        for it in items:
            self._sum += float(it.edit.mean())
            self._n += 1

    def compute_set(self):
        return [ScoreValue(self.name, "all", self._sum / self._n), ScoreValue(self.name, "count", float(self._n))]

    def regions(self):
        return ("all", "count")


from harness.metrics.base import Metric  # noqa: E402


@METRICS.register("test_raises_on")
class RaisesOn(Metric):
    """Mean pixel value, but raises for sample ids listed in param ``bad``."""

    def score_batch(self, items):
        out = []
        for it in items:
            if it.sample.id in self.params.get("bad", ()):
                raise ValueError(f"cannot score {it.sample.id}")
            out.append([ScoreValue(self.name, "all", float(it.edit.mean()))])
        return out


@METRICS.register("test_signed_mean")
class SignedMean(Metric):
    """Mean pixel value minus ``offset``; with ``floor`` set, the protocol clamps the MEAN there
    (like torchmetrics CLIPScore's max(mean, 0))."""

    higher_is_better = True

    def __init__(self, **kw):
        super().__init__(**kw)
        floor = self.params.get("floor")
        self.mean_clamp_min = None if floor is None else float(floor)

    def score_batch(self, items):
        off = float(self.params.get("offset", 0.0))
        return [[ScoreValue(self.name, "all", float(it.edit.mean()) - off)] for it in items]


@METRICS.register("test_load_fails")
class LoadFails(Metric):
    """A metric whose model file turns out corrupt at load time; rows under two names."""

    def load(self):
        raise ValueError("checkpoint is corrupt")

    def output_rows(self):
        return [(f"{self.name}_a", "all"), (f"{self.name}_b", "all")]

    def score_batch(self, items):  # never reached
        raise AssertionError("scored without a model")
