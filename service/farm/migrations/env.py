"""Alembic environment: quantfarm runs migrations programmatically (store.migrate) on a connection it
passes in; `alembic -x url=...` from the command line works too."""
from alembic import context
from sqlalchemy import create_engine

from service.farm.store import metadata

config = context.config


def run(connection):
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=sqlite:///path/quantfarm.db upgrade head")
    with create_engine(url).begin() as conn:
        run(conn)
