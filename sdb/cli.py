"""The `sdb` command line: ML commands (sdb.commands.training, sdb.commands.evaluation), server commands
(sdb.commands.server), sealing (sdb.commands.seal) and tracing (sdb.commands.trace).

Ordinary errors (the service refused, could not be reached, a file is missing) end in one line saying what
went wrong and what to do, with an exit code of their own; `sdb --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Annotated, Any

import typer

from sdb.commands import evaluation, seal, server, trace, training

# Exit codes (0 success, 1 other errors, 2 usage errors: click's own).
EXIT_REFUSED = 3  # the service refused the request (4xx other than below)
EXIT_AUTH = 4  # the API key or token was refused (401/403)
EXIT_LIMIT = 5  # quota spent or rate limit (429)
EXIT_SERVICE = 6  # the service failed or is unavailable (5xx)
EXIT_UNREACHABLE = 7  # no answer from the service
EXIT_INPUT = 8  # a local file or artifact is missing or invalid

app = typer.Typer(
    name="sdb",
    help="Safe Distillation Box: box a classifier, distill students, serve the box.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets (box keys, API keys)
)
training.register(app)
evaluation.register(app)
server.register(app)
seal.register(app)
trace.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdb {version('sdb')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
) -> None:
    """Safe Distillation Box: box a classifier, distill students, serve the box."""


def _message(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("error") or detail)
    return str(detail)


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an ordinary error; None for anything else (a bug: keep the traceback)."""
    import httpx

    from sdb.client import SdbError
    from sdb_core.artifact import ArtifactError
    from sdb_core.data import DataError
    from sdb_core.seal import SealError

    if isinstance(exc, SdbError):
        what = _message(exc.detail)
        if exc.status_code in (401, 403):
            return (
                EXIT_AUTH,
                f"the service refused the API key or token ({what}): check SDB_API_KEY or ask an admin",
            )
        if exc.status_code == 429:
            return EXIT_LIMIT, f"limit reached ({what})"
        if exc.status_code >= 500:
            return EXIT_SERVICE, f"the service failed (HTTP {exc.status_code}: {what}); try again later"
        return EXIT_REFUSED, f"the service refused the request (HTTP {exc.status_code}: {what})"
    if isinstance(exc, httpx.TransportError):
        return EXIT_UNREACHABLE, f"cannot reach the service ({exc}): is it running, and is the URL right?"
    if isinstance(exc, DataError):  # its message names the data set and how to get it (install hint)
        return EXIT_INPUT, f"--data: {exc}"
    if isinstance(exc, FileNotFoundError | ArtifactError | SealError):
        return EXIT_INPUT, str(exc)
    from service.watermarks.suspect import SuspectFailed
    from service.watermarks.tracing import NothingToTrace, WatermarkMismatch

    if isinstance(exc, SuspectFailed):
        return EXIT_UNREACHABLE, f"the suspect gave no usable answer: {exc}"
    if isinstance(exc, NothingToTrace | WatermarkMismatch):
        return EXIT_INPUT, str(exc)
    return None


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except Exception as exc:
        explained = None if debug else explain(exc)
        if explained is None:
            raise
        code, line = explained
        typer.echo(f"sdb: error: {line} (run with --debug for details)", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
