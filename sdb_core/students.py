"""Students trained on worker processes (the evaluation protocol's and the traceability evaluation's): on a
CPU, two single-threaded processes train two small students in about 0.68 of the time one two-threaded
process takes for both (small_cnn:16, 500 images: 8.0 s for two at once against 5.9 s each). A job is any
picklable callable that returns a trained student (a `StudentJob`, or a `functools.partial` of
`distill.distill` or `attacks.train_on_targets`); with one worker the jobs run in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig, distill, distill_logits

Job = Callable[[], nn.Module]


@dataclass(frozen=True)
class StudentJob:
    """A student of `arch` distilled from teacher logits for every training sample (None: the scratch
    student)."""

    ds: Dataset
    arch: str
    extra: dict[str, Any]
    targets: Tensor | None
    cfg: DistillConfig
    desc: str

    def __call__(self) -> nn.Module:
        if self.targets is None:
            return distill(self.ds, self.arch, None, self.cfg, arch_extra=self.extra, desc=self.desc)
        return distill_logits(
            self.ds, self.arch, self.targets, self.cfg, arch_extra=self.extra, desc=self.desc
        )


def _run(job: Job) -> nn.Module:
    return job()


class StudentPool:
    """Runs jobs on `workers` spawned single-threaded processes (in this process when 1)."""

    def __init__(self, workers: int = 1) -> None:
        self._pool = (
            ProcessPoolExecutor(
                workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
            )
            if workers > 1
            else None
        )

    def train(self, jobs: Sequence[Job]) -> list[nn.Module]:
        """The students, in the order of `jobs`."""
        if self._pool is None:
            return [job() for job in jobs]
        return list(self._pool.map(_run, jobs))

    def __enter__(self) -> StudentPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
