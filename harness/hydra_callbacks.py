"""Hydra callbacks: rebuild the run's report once a whole sweep has finished."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("edit_harness")


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("report", True):
            return
        from .cli import report_run

        run_dir = Path(config.results_dir) / config.run_name
        if (run_dir / "jobs").is_dir():
            report_run([run_dir], run_dir / "report")
