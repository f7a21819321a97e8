"""Alembic environment: the URL comes from the caller (service.db.migrate) or SDB_DATABASE_URL."""

from __future__ import annotations

import os

from alembic import context

from service.db.models import Base
from service.db.session import WRITE, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    return os.environ.get("SDB_DATABASE_URL", "sqlite:///./var/sdb.db")


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            # SQLite: take the write lock at BEGIN, so that two processes migrating at once queue up
            # (busy timeout) instead of failing on a lock upgrade.
            connection.execution_options(**WRITE)
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
