"""ML commands: train-teacher, box, distill, evaluate, demo."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the core commands to the top-level app."""
