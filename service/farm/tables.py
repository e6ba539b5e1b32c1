"""The store's tables (SQLAlchemy Core), for the queries in store.py and store_runs.py. The database's
schema itself comes from the Alembic migrations in service/farm/migrations; a column added here needs one.
"""
from sqlalchemy import JSON, Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("dedup_key", String(100), nullable=False, unique=True),   # recipe key, or recipe key + a nonce (force)
    Column("recipe_key", String(64), nullable=False, index=True),
    Column("model", String(300), nullable=False, index=True),
    Column("revision", String(100)),
    Column("spec", JSON, nullable=False),
    Column("state", String(20), nullable=False, index=True),
    Column("step", String(40)),
    Column("layers_done", Integer, nullable=False, default=0),
    Column("layers_total", Integer),
    Column("priority", Integer, nullable=False, default=0),
    Column("memory_gb", Float, nullable=False, default=0.0),
    Column("attempt", Integer, nullable=False, default=1),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("worker", String(200)),
    Column("lease_expires", Float),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("error", Text),
    Column("result", JSON),
    Column("submitted_by", String(100)),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("ts", Float, nullable=False),
    Column("kind", String(20), nullable=False),      # state | step | layer | log
    Column("message", Text, nullable=False),
    Column("data", JSON),
)

artifacts = Table(
    "artifacts", metadata,
    Column("id", String(32), primary_key=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("path", Text, nullable=False),
    Column("format", String(40), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("published", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
)

workers = Table(
    "workers", metadata,
    Column("id", String(200), primary_key=True),
    Column("device", String(40), nullable=False),
    Column("memory_gb", Float, nullable=False),        # what a job may use there (GPU memory, or host memory)
    Column("seen_at", Float, nullable=False, index=True),
)

batch_runs = Table(
    "batch_runs", metadata,
    Column("id", String(32), primary_key=True),
    Column("batch", String(200), nullable=False),
    Column("slot", String(64), nullable=False),
    Column("state", String(20), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("counts", JSON),
    Column("report", JSON),
)

releases = Table(
    "releases", metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(300), nullable=False, index=True),
    Column("revision", String(100), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("submitted_by", String(100)),
    Column("batch_run", String(32), ForeignKey("batch_runs.id")),
    Column("created_at", Float, nullable=False),
)

release_jobs = Table(
    "release_jobs", metadata,
    Column("release_id", String(32), ForeignKey("releases.id"), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False),
    Column("note", Text),
    Column("reused", Boolean, nullable=False),
)

TERMINAL = ("succeeded", "failed", "failed_quality", "publish_failed", "cancelled")
STATES = ("queued", "running") + TERMINAL
RESUBMITTABLE = ("failed", "cancelled")      # the same recipe submitted again makes a new job


def as_dict(row) -> dict | None:
    """A result row as a plain dict (None stays None): what the store's callers get."""
    return None if row is None else dict(row._mapping)
