"""The `sdb` command line: core ML commands (sdb.commands.core) and server commands (sdb.commands.server)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

from sdb.commands import core, server

app = typer.Typer(
    name="sdb",
    help="Safe Distillation Box: box a classifier, distill students, serve the box.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets (box keys, API keys)
)
core.register(app)
server.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdb {version('sdb')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Safe Distillation Box: box a classifier, distill students, serve the box."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
