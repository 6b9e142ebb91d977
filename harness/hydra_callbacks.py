"""Hydra callbacks: the end of a sweep (one summary line, then the run's report, rebuilt once)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("edit_harness")


class ReportCallback(Callback):
    """At the end of a multirun: say how many jobs ran and how long the sweep took, then
    rebuild the run's report from every job's tables (the jobs themselves do not, so that a
    sweep writes its report once)."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from .cli import SWEEP_JOBS_ENV, _duration, report_run

        # set for the jobs (hydra.job.env_set), not in this process
        total = OmegaConf.select(config, f"hydra.job.env_set.{SWEEP_JOBS_ENV}", default=None)
        if total and self._start is not None:
            print(f"sweep done: {total} job(s) in {_duration(time.perf_counter() - self._start)}", flush=True)
        if not config.get("report", True):
            return
        run_dir = Path(config.results_dir) / config.run_name
        if (run_dir / "jobs").is_dir():
            report_run([run_dir], run_dir / "report")
