"""workers: each worker's device and memory budget, so the API can refuse jobs no worker can hold

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("device", sa.String(40), nullable=False),
        sa.Column("memory_gb", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False, index=True),
    )


def downgrade():
    op.drop_table("workers")
