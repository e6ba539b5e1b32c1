"""Releases on the farm: a release's variants are admitted together (all pass or none is queued), each
becomes a job (or links the job that already has its recipe: built once, shared by every release that
asks for it), and the release's own state and summary are read from its jobs."""
import uuid
from dataclasses import dataclass
from typing import Callable

from evaluation import release_report
from service.job import blobstore, release
from service.job.release import ReleaseSpec

from . import admission
from .store import Store, Submission, Submitter


@dataclass(frozen=True)
class ReleaseChecks:
    """How a release is checked under its submitter's rights and the server's policy: `pin(rs)` ->
    ResolvedModel; `admit(spec, src)` -> admission.Admitted, raising on a refusal; `limit(n)`: the
    submitter's quotas on a release of n jobs (quotas.check), raising; None: no quotas."""
    pin: Callable
    admit: Callable
    limit: Callable[[int], None] | None = None


def submit(store: Store, rs: ReleaseSpec, checks: ReleaseChecks, submitter: Submitter) -> dict:
    """Pin the source once, admit every variant (the first refusal raises, before any is queued), then queue
    them and record the release; returns its view. The quotas are checked before any variant is admitted."""
    src = checks.pin(rs)
    pinned = src.revision or src.content_hash
    facts = admission.model_facts(src)
    variants = rs.jobs(pinned, facts and {i for i, _ in facts.shapes})
    if checks.limit is not None:
        checks.limit(len(variants))
    planned = [(name, spec, note, checks.admit(spec, src)) for name, spec, note in variants]
    release_id = uuid.uuid4().hex
    links = []
    for position, (name, spec, note, ok) in enumerate(planned):
        job, created = store.queue(spec.model_dump(mode="json"), Submission.of(spec, ok, submitter))
        links.append({"release_id": release_id, "variant": name, "position": position, "job_id": job["id"], "note": note,
                      "reused": not created})
    store.record_release(release_id, rs.model, pinned, rs.model_dump(mode="json"), submitter, links)
    return get(store, release_id)


def get(store: Store, release_id: str) -> dict | None:
    """The release with one summary row per variant (read from each finished job's report.json)."""
    found = store.release_with_variants(release_id)
    if found is None:
        return None
    r, links = found
    rows = []
    for link in sorted(links, key=lambda x: x["position"]):
        art = (link["result"] or {}).get("artifact")
        rep = blobstore.read_report(art)
        row = release_report.row(link["variant"], link["state"], rep, error=link["error"], note=link["note"],
                                 job_id=link["job_id"])
        row["reused_job"] = link["reused"]
        rows.append(row)
    spec = r["spec"]
    return release_report.summary({"id": r["id"], "model": r["model"], "revision": r["revision"],
                                   "preset": spec.get("preset"), "hub_model": len(r["revision"]) == 40,
                                   "batch_run": r["batch_run"], "submitted_by": r["submitted_by"],
                                   "created_at": r["created_at"],
                                   "state": release.state([x["state"] for x in rows])}, rows)


def list_(store: Store, model: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    ids, total = store.list_release_ids(model, limit, offset)
    return [get(store, i) for i in ids], total
