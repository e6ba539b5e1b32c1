"""releases (one model at a pinned revision, its variants' jobs) and batch runs (nightly re-quantization)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "batch_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("batch", sa.String(200), nullable=False),
        sa.Column("slot", sa.String(64), nullable=False),          # the schedule's fire time, or the run's id
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("counts", sa.JSON),
        sa.Column("report", sa.JSON),
        sa.UniqueConstraint("batch", "slot", name="uq_batch_runs_slot"),   # one run per firing, any process
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(300), nullable=False, index=True),
        sa.Column("revision", sa.String(100), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("submitted_by", sa.String(100)),
        sa.Column("batch_run", sa.String(32), sa.ForeignKey("batch_runs.id"), index=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "release_jobs",
        sa.Column("release_id", sa.String(32), sa.ForeignKey("releases.id"), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),         # the variants' order in the release
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("note", sa.Text),
        sa.Column("reused", sa.Boolean, nullable=False),           # the job existed: same recipe built before
    )


def downgrade():
    op.drop_table("release_jobs")
    op.drop_table("releases")
    op.drop_table("batch_runs")
