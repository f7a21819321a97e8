"""Before a command opens a SQLite database for writing: can this process write the file and its directory?

SQLite itself only says "attempt to write a readonly database" or "unable to open database file", deep in a
traceback and without the path; `sqlite_write_problem` probes for real (a directory it creates if missing, a
scratch file next to the database, the file opened for writing) and returns one line naming the path and
what to do. PostgreSQL URLs and in-memory databases have nothing to check here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

FIX = "make it writable for this user (chown/chmod) or point SDB_DATABASE_URL at a writable place"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases, in-memory and URI (`file:`) databases."""
    try:
        u = make_url(url)
    except ArgumentError:
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    if u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser().absolute()


def sqlite_write_problem(url: str) -> str | None:
    """One line saying why this process cannot write the SQLite database of `url`, or None."""
    path = sqlite_path(url)
    if path is None:
        return None
    who = f"uid {os.geteuid()}"
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (
            f"cannot create the directory {directory} of the SQLite database {path} ({exc.strerror}): {FIX}"
        )
    try:  # SQLite creates its -wal and -shm files (and a new database) in this directory
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return (
            f"the directory {directory} of the SQLite database {path} is not writable by this process "
            f"({who}: {exc.strerror}); SQLite writes {path.name}-wal and {path.name}-shm there: {FIX}"
        )
    if path.exists():
        try:
            with path.open("r+b"):
                pass
        except OSError as exc:
            return (
                f"the SQLite database {path} is not writable by this process ({who}: {exc.strerror}): {FIX}"
            )
    return None
