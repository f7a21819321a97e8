"""Database layer: models, engine/session handling, Alembic wrappers."""
