"""The store's queries on releases (a model's variants, each linked to its job) and batch runs (one row per
schedule firing, unique per batch and slot). `Store` (store.py) takes them in as a mixin: one engine, one
place for the SQL; releases.py and batch.py keep only what the rows mean.
"""
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .tables import as_dict as _row
from .tables import batch_runs, jobs, release_jobs, releases


@dataclass(frozen=True)
class Submitter:
    """Who queues jobs and on what terms: `name` (a token's name, or batch:NAME) is recorded as submitted_by,
    every job gets `max_attempts`, and a release made by a batch run names it in `batch_run`."""
    name: str | None
    max_attempts: int = 3
    batch_run: str | None = None


class ReleaseAndBatchQueries:
    """A mixin of Store: these run on its engine."""

    # ---- releases ------------------------------------------------------------------------------------

    def record_release(self, release_id: str, model: str, revision: str, spec: dict, submitter: Submitter,
                       links: list[dict]) -> None:
        """The release row and its variants' links to their jobs (release_jobs rows), in one transaction."""
        with self.engine.begin() as c:
            c.execute(insert(releases).values(id=release_id, model=model, revision=revision, spec=spec,
                                              submitted_by=submitter.name, batch_run=submitter.batch_run,
                                              created_at=time.time()))
            c.execute(insert(release_jobs), links)

    def release_with_variants(self, release_id: str) -> tuple[dict, list[dict]] | None:
        """(the release row, its variant links each with its job's state, error and result); None: no such
        release. Both are read in one transaction."""
        with self.engine.connect() as c:
            r = c.execute(select(releases).where(releases.c.id == release_id)).first()
            if r is None:
                return None
            links = c.execute(select(release_jobs, jobs.c.state, jobs.c.error, jobs.c.result)
                              .join(jobs, jobs.c.id == release_jobs.c.job_id)
                              .where(release_jobs.c.release_id == release_id)).all()
        return _row(r), [_row(x) for x in links]

    def list_release_ids(self, model: str | None, limit: int, offset: int) -> tuple[list[str], int]:
        """A page of release ids, newest first (of one model, or all), and how many there are in all."""
        q, n = select(releases.c.id), select(func.count()).select_from(releases)
        if model is not None:
            q, n = q.where(releases.c.model == model), n.where(releases.c.model == model)
        with self.engine.connect() as c:
            ids = [x.id for x in c.execute(q.order_by(releases.c.created_at.desc(), releases.c.id)
                                           .limit(limit).offset(offset))]
            return ids, c.execute(n).scalar_one()

    def previous_release(self, model: str, before: float) -> dict | None:
        """The id and revision of the model's latest release made before `before` (a created_at); None: none."""
        with self.engine.connect() as c:
            return _row(c.execute(select(releases.c.id, releases.c.revision)
                                  .where(releases.c.model == model, releases.c.created_at < before)
                                  .order_by(releases.c.created_at.desc()).limit(1)).first())

    # ---- batch runs ----------------------------------------------------------------------------------

    def open_batch_run(self, run_id: str, batch: str, slot: str, report: dict) -> bool:
        """Insert a running run for (batch, slot); False when another process already holds the slot."""
        try:
            with self.engine.begin() as c:
                c.execute(insert(batch_runs).values(id=run_id, batch=batch, slot=slot, state="running",
                                                    started_at=time.time(), report=report))
        except IntegrityError:
            return False
        return True

    def record_overlap(self, batch: str, slot: str, reason: str) -> None:
        """A firing skipped because the batch's previous run still goes on: a finished row in state `overlap`
        (nothing when another process recorded the slot first)."""
        try:
            with self.engine.begin() as c:
                c.execute(insert(batch_runs).values(id=uuid.uuid4().hex, batch=batch, slot=slot, state="overlap",
                                                    started_at=time.time(), finished_at=time.time(),
                                                    report={"reason": reason}))
        except IntegrityError:
            pass

    def set_batch_report(self, run_id: str, report: dict) -> None:
        with self.engine.begin() as c:
            c.execute(update(batch_runs).where(batch_runs.c.id == run_id).values(report=report))

    def close_batch_run(self, run_id: str, report: dict) -> bool:
        """Store a running run's final report (its finished_at and counts with it); False when it was no
        longer running (another process closed it first)."""
        with self.engine.begin() as c:
            return bool(c.execute(update(batch_runs).where(batch_runs.c.id == run_id, batch_runs.c.state == "running")
                                  .values(state="done", finished_at=report["finished_at"], counts=report["counts"],
                                          report=report)).rowcount)

    def batch_run_with_releases(self, run_id: str) -> tuple[dict, list[dict]] | None:
        """(the run row, the releases it submitted, oldest first); None: no such run. One transaction."""
        with self.engine.connect() as c:
            run = c.execute(select(batch_runs).where(batch_runs.c.id == run_id)).first()
            if run is None:
                return None
            rels = c.execute(select(releases).where(releases.c.batch_run == run_id)
                             .order_by(releases.c.created_at)).all()
        return _row(run), [_row(r) for r in rels]

    def running_batch_run_ids(self, batch: str | None = None) -> list[str]:
        """Ids of the runs still going on (of one batch, or all)."""
        q = select(batch_runs.c.id).where(batch_runs.c.state == "running")
        if batch is not None:
            q = q.where(batch_runs.c.batch == batch)
        with self.engine.connect() as c:
            return [r.id for r in c.execute(q)]

    def has_batch_slot(self, batch: str, slot: str) -> bool:
        """Whether some process already recorded a run (or an overlap) for this firing."""
        with self.engine.connect() as c:
            return c.execute(select(batch_runs.c.id).where(batch_runs.c.batch == batch,
                                                           batch_runs.c.slot == slot)).first() is not None

    def list_batch_runs(self, batch: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
        """A page of runs, newest first (of one batch, or all), without their reports, and the total."""
        q = select(batch_runs.c.id, batch_runs.c.batch, batch_runs.c.slot, batch_runs.c.state,
                   batch_runs.c.started_at, batch_runs.c.finished_at, batch_runs.c.counts)
        n = select(func.count()).select_from(batch_runs)
        if batch is not None:
            q, n = q.where(batch_runs.c.batch == batch), n.where(batch_runs.c.batch == batch)
        with self.engine.connect() as c:
            rows = [_row(r) for r in c.execute(q.order_by(batch_runs.c.started_at.desc()).limit(limit).offset(offset))]
            return rows, c.execute(n).scalar_one()

    def finished_batch_counts(self) -> list[dict]:
        """The counts of every finished run ({} where a run has none)."""
        with self.engine.connect() as c:
            return [r.counts or {} for r in c.execute(select(batch_runs.c.counts).where(batch_runs.c.state == "done"))]
