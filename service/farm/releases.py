"""Releases on the farm: a release's variants are admitted together (all pass or none is queued), each
becomes a job (or links the job that already has its recipe: built once, shared by every release that
asks for it), and the release's own state and summary are read from its jobs."""
import time
import uuid

from sqlalchemy import func, insert, select

from evaluation import release_report
from service.job import blobstore, release
from service.job.release import ReleaseSpec

from . import admission
from .store import Store, jobs, release_jobs, releases


def submit(store: Store, rs: ReleaseSpec, *, pin, admit, submitted_by: str | None, max_attempts: int = 3,
           batch_run: str | None = None, limit=None) -> dict:
    """Pin the source once (`pin(rs)` -> ResolvedModel), admit every variant (`admit(spec, src)` ->
    admission.Admitted, raising on the first refusal), then queue them and record the release; returns its view.
    `limit(n)`: the submitter's quotas on a release of n jobs (quotas.check), raising before any is admitted."""
    src = pin(rs)
    pinned = src.revision or src.content_hash
    facts = admission.model_facts(src)
    variants = rs.jobs(pinned, facts and {i for i, _ in facts.shapes})
    if limit is not None:
        limit(len(variants))
    planned = [(name, spec, note, admit(spec, src)) for name, spec, note in variants]
    release_id = uuid.uuid4().hex
    links = []
    for position, (name, spec, note, ok) in enumerate(planned):
        job, created = store.submit(spec.model_dump(mode="json"), spec.recipe_key(ok.revision), spec.model,
                                    ok.revision, priority=spec.priority, memory_gb=ok.memory_gb,
                                    max_attempts=max_attempts, submitted_by=submitted_by)
        links.append({"release_id": release_id, "variant": name, "position": position, "job_id": job["id"], "note": note,
                      "reused": not created})
    with store.engine.begin() as c:
        c.execute(insert(releases).values(id=release_id, model=rs.model, revision=pinned,
                                          spec=rs.model_dump(mode="json"), submitted_by=submitted_by,
                                          batch_run=batch_run, created_at=time.time()))
        c.execute(insert(release_jobs), links)
    return get(store, release_id)


def get(store: Store, release_id: str) -> dict | None:
    """The release with one summary row per variant (read from each finished job's report.json)."""
    with store.engine.connect() as c:
        r = c.execute(select(releases).where(releases.c.id == release_id)).first()
        if r is None:
            return None
        links = c.execute(select(release_jobs, jobs.c.state, jobs.c.error, jobs.c.result)
                          .join(jobs, jobs.c.id == release_jobs.c.job_id)
                          .where(release_jobs.c.release_id == release_id)).all()
    rows = []
    for link in sorted(links, key=lambda x: x.position):
        art = (link.result or {}).get("artifact")
        rep = blobstore.read_report(art)
        row = release_report.row(link.variant, link.state, rep, error=link.error, note=link.note, job_id=link.job_id)
        row["reused_job"] = link.reused
        rows.append(row)
    spec = r.spec
    return release_report.summary({"id": r.id, "model": r.model, "revision": r.revision, "preset": spec.get("preset"),
                                   "hub_model": len(r.revision) == 40, "batch_run": r.batch_run,
                                   "submitted_by": r.submitted_by, "created_at": r.created_at,
                                   "state": release.state([x["state"] for x in rows])}, rows)


def list_(store: Store, model: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    q, n = select(releases.c.id), select(func.count()).select_from(releases)
    if model is not None:
        q, n = q.where(releases.c.model == model), n.where(releases.c.model == model)
    with store.engine.connect() as c:
        ids = [x.id for x in c.execute(q.order_by(releases.c.created_at.desc(), releases.c.id).limit(limit).offset(offset))]
        total = c.execute(n).scalar_one()
    return [get(store, i) for i in ids], total
