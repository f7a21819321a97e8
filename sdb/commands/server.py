"""Service commands: serve, admin, db."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the service commands to the top-level app."""
