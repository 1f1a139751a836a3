"""Alembic environment: the schema is the SQLModel metadata in dr_bridge.store."""
from alembic import context
from sqlalchemy import engine_from_config, pool, text

from dr_bridge import store  # noqa: F401  (registers the tables)
from sqlmodel import SQLModel

config = context.config
target_metadata = SQLModel.metadata
MIGRATION_LOCK = 0x64722D62  # any fixed number; the same for every bridge ("dr-b")


def run_migrations_online() -> None:
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        # render_as_batch: SQLite can only alter tables by copying them.
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Bridges sharing a database may start (or be upgraded) together: one migrates, the others
                # wait for it and then find nothing left to do, rather than failing on the same CREATE.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()


run_migrations_online()
