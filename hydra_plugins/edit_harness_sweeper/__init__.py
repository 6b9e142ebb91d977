"""Hydra's basic sweeper, without its second composition of jobs the CLI has already checked.

``edit-harness run`` composes and checks every job of a sweep before Hydra starts
(:func:`harness.cli.check_jobs`). Hydra's basic sweeper then composes every job once more, with
its ``hydra`` node, only to see that it composes (``Sweeper.validate_batch_is_legal``), and the
launcher composes each job a third time to run it. On the 10-job rerun benchmark that middle
pass was about 1 s of 6. This sweeper skips it for a batch whose every job is one the CLI
checked in this process, and validates any other batch as Hydra does (a sweep started by other
code, a job list that differs in any way).

Hydra instantiates sweepers only from the ``hydra_plugins`` package, hence its place here.
Selected in ``conf/config.yaml`` (``override hydra/sweeper: edit_harness``,
``conf/hydra/sweeper/edit_harness.yaml``); it takes the basic sweeper's settings
(``max_batch_size``, ``params``, which experiments use for their own sweeps).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

_checked: set[tuple[str, ...]] = set()


@contextlib.contextmanager
def checked_jobs(points: Sequence[Sequence[str]]) -> Iterator[None]:
    """Within the block, batches made only of these jobs (their override lists) are not
    composed again by the sweeper."""
    added = {tuple(p) for p in points} - _checked
    _checked.update(added)
    try:
        yield
    finally:
        _checked.difference_update(added)


class CheckedBasicSweeper(BasicSweeper):
    """:class:`BasicSweeper` that trusts the jobs :func:`checked_jobs` names (module doc), and
    expands ``dataset.shards: N`` (in an experiment's ``hydra.sweeper.params`` or the command
    line) into the sweep of its shards, ``dataset.shard=0/N,...,N-1/N`` (harness.merge)."""

    def _parse_config(self) -> list[str]:
        from harness.merge import expand_shards

        return expand_shards(super()._parse_config())

    def sweep(self, arguments: list[str]):
        from harness.merge import expand_shards

        return super().sweep(expand_shards(list(arguments)))

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if batch and all(tuple(job) in _checked for job in batch):
            return
        super().validate_batch_is_legal(batch)
