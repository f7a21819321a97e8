"""Alembic wrappers: upgrade, downgrade, and the start-up check that the schema is at the head revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.db.session import normalize_url

ROOT = Path(__file__).resolve().parents[2]
UPGRADE_COMMAND = "sdb db upgrade"


class SchemaError(RuntimeError):
    """The database schema is missing or not at the revision this code expects."""


def alembic_config(url: str) -> Config:
    ini = ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    # ConfigParser interpolation treats '%' specially; URL-encoded passwords contain it.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    script = ScriptDirectory(str(ROOT / "migrations"))
    head = script.get_current_head()
    if head is None:
        raise SchemaError("no Alembic revisions found in migrations/")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise SchemaError, naming the command to run, unless the database is at the head revision."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    where = "has no schema" if current is None else f"is at revision {current}"
    raise SchemaError(
        f"the database {where}, this version of sdb needs revision {head}: "
        f"run `{UPGRADE_COMMAND}` (alembic upgrade head) with the same SDB_DATABASE_URL, then start again"
    )
