"""The job store: jobs, their events and their artifacts in SQLAlchemy tables (tables.py); the queries on
releases and batch runs are store_runs.py's, a mixin of `Store`.

SQLite (WAL) is the embedded default, PostgreSQL the farm's shared store; the schema comes from the
Alembic migrations in service/farm/migrations, applied by `migrate`. Every state change is a
conditional UPDATE (WHERE state = ... AND worker = ...), so concurrent workers and API processes
never need row locks: whoever's update matches wins, the others see rowcount 0.

    queued -> running -> succeeded | failed | failed_quality | publish_failed | cancelled
    publish_failed --retry--> queued -> running (publishing only) -> succeeded | publish_failed
    running --lease expired--> queued (attempt + 1) or failed after max_attempts
"""
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .store_runs import ReleaseAndBatchQueries, Submitter
# the tables are re-exported here: the migrations (metadata) and callers name them from the store
from .tables import (RESUBMITTABLE, STATES, TERMINAL, artifacts, batch_runs, events, jobs, metadata,  # noqa: F401
                     release_jobs, releases, workers)
from .tables import as_dict as _row


def private_sqlite_file(path: Path) -> None:
    """The store holds every job's spec and owner: create it owner-only (0600); SQLite gives its -wal and
    -shm files the database file's mode, and files made by older versions are narrowed too."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if f.exists() and f.stat().st_mode & 0o077:
            f.chmod(0o600)


def make_engine(url: str):
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            private_sqlite_file(Path(path))
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30)


def migrate(engine, to: str = "head"):
    """Bring the schema to the latest Alembic revision, or to revision `to` (idempotent; safe from several
    processes)."""
    import logging

    from alembic import command
    from alembic.config import Config
    logging.getLogger("alembic").setLevel(logging.WARNING)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":     # one migrator at a time across processes
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7316)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, to)


@dataclass(frozen=True)
class Submission:
    """A job to queue, apart from its spec: its recipe key at the pinned revision (two jobs with the same key
    make the same artifact) and its terms in the queue."""
    recipe_key: str
    model: str
    revision: str | None
    priority: int = 0
    memory_gb: float = 0.0
    max_attempts: int = 3
    submitted_by: str | None = None

    @classmethod
    def of(cls, spec, admitted, submitter: Submitter) -> "Submission":
        """An admitted JobSpec's submission (`admitted`: admission.Admitted, its pinned revision and memory)."""
        return cls(spec.recipe_key(admitted.revision), spec.model, admitted.revision, priority=spec.priority,
                   memory_gb=admitted.memory_gb, max_attempts=submitter.max_attempts, submitted_by=submitter.name)


class Store(ReleaseAndBatchQueries):
    def __init__(self, url: str, lease_seconds: float = 30.0):
        self.url = url
        self.engine = make_engine(url)
        self.lease_seconds = lease_seconds

    # ---- submission and queries ----------------------------------------------------------------

    def queue(self, spec: dict, job: Submission, force: bool = False) -> tuple[dict, bool]:
        """Store a job unless one with the same recipe exists; returns (job, created). A failed or cancelled
        job does not hold its recipe: it is retired (its dedup key gets its id appended) and a new job made.
        `force`: a new job whatever exists (its dedup key is made unique)."""
        recipe_key = job.recipe_key
        for _ in range(5):
            now = time.time()
            job_id = uuid.uuid4().hex
            dedup = f"{recipe_key}:{job_id}" if force else recipe_key
            row = dict(id=job_id, dedup_key=dedup, recipe_key=recipe_key, model=job.model, revision=job.revision,
                       spec=spec, state="queued", step=None, layers_done=0, priority=job.priority,
                       memory_gb=job.memory_gb, attempt=1, max_attempts=job.max_attempts, cancel_requested=False,
                       submitted_by=job.submitted_by, created_at=now)
            try:
                with self.engine.begin() as c:
                    c.execute(insert(jobs).values(**row))
                    self._event(c, job_id, "state", "queued", {"priority": job.priority})
                return self.get(job_id), True
            except IntegrityError:
                with self.engine.connect() as c:
                    existing = _row(c.execute(select(jobs).where(jobs.c.dedup_key == recipe_key)).first())
            if existing is None:       # retired by a concurrent resubmission in between: try again
                continue
            if existing["state"] not in RESUBMITTABLE:
                return existing, False
            with self.engine.begin() as c:
                if c.execute(update(jobs).where(jobs.c.id == existing["id"], jobs.c.dedup_key == recipe_key,
                                                jobs.c.state.in_(RESUBMITTABLE)).values(
                        dedup_key=f"{recipe_key}:{existing['id']}")).rowcount:
                    self._event(c, existing["id"], "log", "the same recipe was submitted again: a new job runs it")
        raise RuntimeError(f"recipe {recipe_key} kept changing hands during submission")    # 5 lost races

    def submit(self, spec: dict, recipe_key: str, model: str, revision: str | None, **terms) -> tuple[dict, bool]:
        """`queue` with the submission written out (scripts, tests); `terms`: Submission's priority,
        memory_gb, max_attempts and submitted_by, by name."""
        return self.queue(spec, Submission(recipe_key, model, revision, **terms))

    def get(self, job_id: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(select(jobs).where(jobs.c.id == job_id)).first())

    def ids_starting(self, kind: str, prefix: str, limit: int = 3) -> list[str]:
        """Ids of jobs (kind "job"), artifacts ("artifact"), releases ("release") or batch runs ("batch run")
        that start with `prefix`, at most `limit`."""
        table = {"job": jobs, "artifact": artifacts, "release": releases, "batch run": batch_runs}[kind]
        with self.engine.connect() as c:
            return [r.id for r in c.execute(select(table.c.id).where(table.c.id.startswith(prefix, autoescape=True))
                                            .order_by(table.c.id).limit(limit))]

    def list_jobs(self, state: str | None = None, model: str | None = None, limit: int = 50, offset: int = 0):
        q = select(jobs)
        n = select(func.count()).select_from(jobs)
        for col, v in ((jobs.c.state, state), (jobs.c.model, model)):
            if v is not None:
                q, n = q.where(col == v), n.where(col == v)
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit).offset(offset)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)], c.execute(n).scalar_one()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {s: n for s, n in c.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))}

    def active_jobs(self, submitted_by: str) -> int:
        """Jobs of one submitter queued or running: its share of the queue, for quotas (service/farm/quotas.py)."""
        with self.engine.connect() as c:
            return c.execute(select(func.count()).select_from(jobs).where(
                jobs.c.submitted_by == submitted_by, jobs.c.state.in_(("queued", "running")))).scalar_one()

    def durations(self) -> list[float]:
        with self.engine.connect() as c:
            return [r.finished_at - r.started_at for r in c.execute(
                select(jobs.c.started_at, jobs.c.finished_at).where(jobs.c.state == "succeeded"))
                if r.started_at and r.finished_at]

    def events_after(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        with self.engine.connect() as c:
            q = select(events).where(events.c.job_id == job_id, events.c.id > after).order_by(events.c.id).limit(limit)
            return [_row(r) for r in c.execute(q)]

    def artifact(self, artifact_id: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(select(artifacts).where(artifacts.c.id == artifact_id)).first())

    def artifacts_of(self, job_id: str) -> list[dict]:
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(select(artifacts).where(artifacts.c.job_id == job_id))]

    # ---- events ----------------------------------------------------------------------------------

    @staticmethod
    def _event(c, job_id, kind, message, data=None):
        c.execute(insert(events).values(job_id=job_id, ts=time.time(), kind=kind, message=message, data=data))

    def add_event(self, job_id: str, kind: str, message: str, data: dict | None = None):
        with self.engine.begin() as c:
            self._event(c, job_id, kind, message, data)

    # ---- the queue ---------------------------------------------------------------------------------

    def claim(self, worker: str, memory_gb: float | None = None) -> dict | None:
        """The highest-priority queued job that fits, now leased to `worker`; None when there is none."""
        self.requeue_expired()
        q = select(jobs.c.id).where(jobs.c.state == "queued", jobs.c.cancel_requested.is_(False))
        if memory_gb is not None:
            q = q.where(jobs.c.memory_gb <= memory_gb)
        q = q.order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id).limit(8)
        with self.engine.connect() as c:
            candidates = [r.id for r in c.execute(q)]
        for job_id in candidates:
            now = time.time()
            with self.engine.begin() as c:
                won = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued").values(
                    state="running", worker=worker, lease_expires=now + self.lease_seconds,
                    started_at=func.coalesce(jobs.c.started_at, now))).rowcount
                if won:
                    job = _row(c.execute(select(jobs).where(jobs.c.id == job_id)).first())
                    self._event(c, job_id, "state", "running", {"worker": worker, "attempt": job["attempt"]})
                    return job
        return None

    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]:
        """Renew the lease; returns (still ours, cancel requested)."""
        with self.engine.begin() as c:
            ours = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker == worker,
                                                jobs.c.state == "running").values(
                lease_expires=time.time() + self.lease_seconds)).rowcount == 1
            cancel = c.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar_one_or_none()
        return ours, bool(cancel)

    def progress(self, job_id: str, worker: str, **values) -> bool:
        with self.engine.begin() as c:
            return c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker == worker,
                                                jobs.c.state == "running").values(**values)).rowcount == 1

    def requeue_expired(self) -> int:
        """Running jobs whose lease ran out go back to the queue (or fail after max_attempts)."""
        now = time.time()
        with self.engine.connect() as c:
            stale = [_row(r) for r in c.execute(select(jobs.c.id, jobs.c.worker)
                                                .where(jobs.c.state == "running", jobs.c.lease_expires < now))]
        return sum(self.lost(j["id"], j["worker"], f"lease of {j['worker']} expired",
                             "stopped answering") for j in stale)

    def lost(self, job_id: str, worker: str, reason: str, what: str = "was lost") -> bool:
        """A running job whose worker is gone (lease expired, or its node died) goes back to the queue as its
        next attempt, resuming from its per-layer state, or fails after max_attempts."""
        with self.engine.connect() as c:
            j = _row(c.execute(select(jobs.c.attempt, jobs.c.max_attempts).where(jobs.c.id == job_id)).first())
        if j is None:
            return False
        retry, now = j["attempt"] < j["max_attempts"], time.time()
        values = dict(state="queued", worker=None, lease_expires=None, attempt=j["attempt"] + 1) if retry else dict(
            state="failed", worker=None, finished_at=now,
            error=f"the worker running this job {what} {j['attempt']} times ({reason}); "
                  f"retry it with POST /v1/jobs/{job_id}/retry once the workers are healthy")
        with self.engine.begin() as c:
            if c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running",
                                            jobs.c.worker == worker).values(**values)).rowcount:
                self._event(c, job_id, "state", values["state"], {"reason": reason, "attempt": values.get("attempt")})
                return True
        return False

    def release(self, job_id: str, worker: str) -> bool:
        """A worker that is shutting down hands its running job back to the queue at once (same attempt;
        the next worker resumes from its per-layer state) instead of making it wait for the lease to run out."""
        with self.engine.begin() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker == worker,
                                                jobs.c.state == "running").values(
                state="queued", worker=None, lease_expires=None)).rowcount == 1
            if done:
                self._event(c, job_id, "state", "queued", {"reason": f"worker {worker} stopped"})
        return done

    # ---- workers ----------------------------------------------------------------------------------

    def worker_seen(self, worker: str, device: str, memory_gb: float) -> None:
        """A worker says it is alive, with its memory budget."""
        now = time.time()
        with self.engine.begin() as c:
            if c.execute(update(workers).where(workers.c.id == worker)
                         .values(seen_at=now, memory_gb=memory_gb)).rowcount:
                return
        try:
            with self.engine.begin() as c:
                c.execute(insert(workers).values(id=worker, device=device[:40], memory_gb=memory_gb, seen_at=now))
        except IntegrityError:
            pass                                    # a second beat of the same worker got there first

    def worker_gone(self, worker: str) -> None:
        with self.engine.begin() as c:
            c.execute(workers.delete().where(workers.c.id == worker))

    def largest_worker_gb(self, within_seconds: float) -> float | None:
        """The largest memory budget among workers seen in the last `within_seconds`; None when none was."""
        with self.engine.connect() as c:
            return c.execute(select(func.max(workers.c.memory_gb))
                             .where(workers.c.seen_at > time.time() - within_seconds)).scalar()

    def last_worker_beat(self) -> float | None:
        """When a worker (serve's, or a `quantfarm worker` on the store) last said it was alive; None: never."""
        with self.engine.connect() as c:
            return c.execute(select(func.max(workers.c.seen_at))).scalar()

    def latest_event_id(self) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.max(events.c.id))).scalar() or 0

    def finish(self, job_id: str, worker: str, state: str, *, error: str | None = None, result: dict | None = None,
               artifact: dict | None = None) -> bool:
        now = time.time()
        with self.engine.begin() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker == worker,
                                                jobs.c.state == "running").values(
                state=state, error=error, result=result, finished_at=now, lease_expires=None)).rowcount == 1
            if done:
                if artifact:
                    c.execute(insert(artifacts).values(id=uuid.uuid4().hex, job_id=job_id, created_at=now, **artifact))
                self._event(c, job_id, "state", state, {"error": error} if error else None)
        return done

    def cancel(self, job_id: str) -> dict | None:
        """A queued job is cancelled at once; a running one at its worker's next layer boundary."""
        now = time.time()
        with self.engine.begin() as c:
            if c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued").values(
                    state="cancelled", cancel_requested=True, finished_at=now)).rowcount:
                self._event(c, job_id, "state", "cancelled", {"reason": "cancelled while queued"})
            elif c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running").values(
                    cancel_requested=True)).rowcount:
                self._event(c, job_id, "log", "cancel requested; the worker stops at the next layer boundary")
        return self.get(job_id)

    def retry(self, job_id: str) -> dict | None:
        """A failed or cancelled job goes back to the queue with attempt + 1 (it resumes from its per-layer state)."""
        with self.engine.begin() as c:
            if c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(("failed", "cancelled", "failed_quality",
                                                                                    "publish_failed"))).values(
                    state="queued", error=None, cancel_requested=False, worker=None, finished_at=None,
                    attempt=jobs.c.attempt + 1, max_attempts=jobs.c.attempt + jobs.c.max_attempts)).rowcount:
                self._event(c, job_id, "state", "queued", {"reason": "retry"})
        return self.get(job_id)

    def mark_published(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(artifacts).where(artifacts.c.job_id == job_id).values(published=True))
