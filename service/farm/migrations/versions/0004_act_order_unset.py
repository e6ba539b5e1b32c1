"""stored specs: act_order "static" unset (each algorithm declares its own default since 2026-12-07)

Before, every stored spec (a job's, and a release's variants) carried act_order "static", the field's default,
whatever its algorithm; only GPTQ used it, and GPTQ's default is that value. Specs now leave act_order unset
unless asked, and an algorithm without act-order refuses it, so a job stored before would be refused by its
worker. Unsetting "static" keeps what every one of them ran, and its recipe key (an unset act_order hashes
as "static").

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _unset(spec: dict) -> bool:
    """Unset act_order "static" in a job's spec or in each variant of a release's; True when it changed."""
    changed = False
    for s in [spec, *(spec.get("variants") or [])]:
        if isinstance(s, dict) and s.get("act_order") == "static":
            del s["act_order"]
            changed = True
    return changed


def upgrade():
    conn = op.get_bind()
    for name in ("jobs", "releases"):
        table = sa.table(name, sa.column("id", sa.String), sa.column("spec", sa.JSON))
        for row in conn.execute(sa.select(table.c.id, table.c.spec)).all():
            spec = dict(row.spec)
            if _unset(spec):
                conn.execute(sa.update(table).where(table.c.id == row.id).values(spec=spec))


def downgrade():
    pass            # an unset act_order reads as before: nothing to undo
