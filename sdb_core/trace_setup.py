"""The traceability evaluation's setup: its configuration (`TraceEvalConfig`, and the one that goes with each
protocol), the owner / transfer / probe split, and what every traced student shares (querying an answer
function in batches, the students' distillation config). The evaluation itself: `sdb_core.trace_eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig
from sdb_core.evaluate import EvalConfig
from sdb_core.training import TrainConfig
from sdb_core.watermark import WatermarkConfig


@dataclass
class TraceEvalConfig:
    licensees: int = 20
    transfers: tuple[int, ...] = (500, 10_000)
    leakers: dict[int, int] = field(default_factory=lambda: {500: 10, 10_000: 4})  # per size, per family
    # families traced at each size (a size not listed: none); empty: all of the protocol's students everywhere
    families: dict[int, tuple[str, ...]] = field(default_factory=dict)
    sample_budget: int = 100_000  # a student sees at most this many samples (epochs scaled down for big sets)
    family_leakers: dict[str, int] = field(default_factory=dict)  # caps `leakers` for a family
    family_sample_budget: dict[str, int] = field(default_factory=dict)  # overrides `sample_budget`
    probes: int = 10_000
    # images of its own that the service keeps per licensee (0: none): every student is also traced on the
    # first this many images of its transfer set, under every watermark (`trace.trace_licensees`; as if
    # every licensee had labelled the same images, the hardest case for framing)
    own_probes: int = 500
    colluder_probe_factor: int = 4
    decoys: int = 1_000
    alpha: float = 1e-3
    source: str = "box"  # the licensees' clean soft labels: "box" (keyed path) or "teacher"
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    retemper: tuple[float, ...] = (1.0, 20.0)
    removal_size: int = 10_000  # transfer size of the student the removal attempts start from
    noise_std: float = 0.1  # input noise at query time, in units of the data's std
    finetune_epochs: int = 20
    removals: bool = True
    innocents: bool = True  # False: leaked students only (a supplementary run)
    # clean KD students per family and size for the cost (seeds seed, seed+1, ...): one clean student moves
    # by tenths of a point between seeds, as much as the mark costs (three seeds of `mlp:512` at 500 images
    # spread 0.06 points on one box, five 0.7 on the next)
    clean_seeds: int = 5
    # processes training the students of each family and size on a CPU (sdb_core.students; one on CUDA)
    workers: int = 2
    # shadow students per family (0: none): clean, distilled from the box's clean soft labels on the owner's
    # own images (the largest transfer size of them, the same recipe); the class pattern channel of every
    # trace of that family's students subtracts their answers instead of the reference's (`trace.trace`)
    shadows: int = 2


def trace_config_for(dataset: str, reduced: bool = False) -> TraceEvalConfig:
    """The traceability configuration that goes with a protocol (`sdb evaluate --trace`)."""
    if reduced:
        return reduced_trace_config(dataset)
    if dataset.startswith("fashion-mnist"):
        return TraceEvalConfig()
    # digits: 1,300 training images, the transfer set is the owner's own (as in its protocol)
    return TraceEvalConfig(transfers=(0,), leakers={0: 5}, probes=10_000, removal_size=0)


def reduced_trace_config(dataset: str) -> TraceEvalConfig:
    """Small enough for the test suite (digits: transfer sets are the owner's own images)."""
    if dataset.startswith("fashion-mnist"):
        return TraceEvalConfig(
            licensees=5,
            transfers=(500, 2_000),
            leakers={500: 2, 2_000: 1},
            probes=4_000,
            decoys=200,
            removal_size=2_000,
            removals=False,
            clean_seeds=2,
        )
    return TraceEvalConfig(
        licensees=5,
        transfers=(0,),
        leakers={0: 3},
        probes=2_000,
        decoys=200,
        removal_size=0,
        clean_seeds=2,
    )


def split_data(
    ds: Dataset, cfg: EvalConfig, tcfg: TraceEvalConfig, seed: int
) -> tuple[Dataset, dict[int, Dataset], np.ndarray]:
    """Owner, transfer sets by size, probe images (raw)."""
    biggest = max(tcfg.transfers)
    if biggest <= 0:  # digits: the owner's own images serve as transfer set; probes = test split
        return ds, {0: ds}, ds.x_test
    n = len(ds.x_train)
    owner_n = cfg.owner_images or n - biggest
    if owner_n + biggest > n:
        raise ValueError(f"{owner_n} owner + {biggest} transfer images > {n} training images")
    perm = np.random.default_rng(1_000 + seed).permutation(n)
    owner = ds.subset(perm[:owner_n], "owner")
    pool = perm[owner_n : owner_n + biggest]
    transfers = {t: ds.subset(pool[:t], f"transfer{t}") for t in tcfg.transfers}
    probes = np.concatenate([ds.x_test, ds.x_train[perm[owner_n + biggest :]]])
    return owner, transfers, probes


def softmax_fn(logits_of: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.softmax(logits_of(x).float(), dim=1).cpu()

    return fn


def query(fn: Callable[[Tensor], Tensor], x: np.ndarray, batch: int = 1_000) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [fn(torch.from_numpy(x[s : s + batch])).float().cpu() for s in range(0, len(x), batch)]
        )


def student_distill_config(
    cfg: EvalConfig,
    tcfg: TraceEvalConfig,
    n: int,
    seed: int,
    spec: str = "",
    temperature: float | None = None,
) -> DistillConfig:
    budget = tcfg.family_sample_budget.get(spec, tcfg.sample_budget)
    epochs = max(1, min(cfg.student_epochs, budget // max(n, 1)))
    return DistillConfig(
        alpha=cfg.alpha,
        temperature=temperature or cfg.temperature,
        labelled_fraction=cfg.labelled_fraction,
        train=TrainConfig(epochs=epochs, seed=seed, device=cfg.device, progress=False),
    )
