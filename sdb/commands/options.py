"""Options and helpers that the ML commands share (sdb.commands.training, .evaluation, .trace)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="digits (bundled), fashion-mnist[:DIR], idx:DIR (MNIST format), cifar10:DIR, cifar100:DIR "
        "or npz:FILE.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = torch default).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (deterministic runs).")]
BoxOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--box-option",
        help="Override a BoxConfig field, KEY=VALUE (repeatable): guard=false; train.KEY for its training, "
        "train.lr=0.05.",
    ),
]

WatermarkOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--watermark-option",
        help="Override a WatermarkConfig field of the licensees' marks on this box, KEY=VALUE (repeatable): "
        "epsilon=0.1 (a stronger mark, at a cost: docs/traceability.md), frequency=1.0, clip=symmetric.",
    ),
]


def override_config(cfg: Any, options: list[str]) -> Any:
    """sdb_core.configurator.override, its errors as bad CLI parameters."""
    from sdb_core.configurator import OverrideError, override

    try:
        return override(cfg, options)
    except OverrideError as exc:
        raise typer.BadParameter(str(exc)) from None


def set_threads(n: int) -> None:
    """torch CPU threads for this process (0: leave torch's default)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def echo_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, indent=2))
