"""/v1/jobs: submit, list, follow (events, logs), cancel and retry jobs; a job's report."""
import json
import re

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from core.errors import QuantfarmError
from service.job import blobstore
from service.job.spec import JobSpec

from .. import quotas
from ..auth import Forbidden, Principal
from ..schemas import Job, JobList, iso
from ..store import STATES, TERMINAL, Store, Submission, Submitter
from .deps import Conflict, Farm, NotFound, current_farm, errors, no_nul, resolve_id, role, shown

SPEC_EXAMPLE = {"model": "smollm2-135m", "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 64,
                "calibration": {"source": "auto", "samples": 128, "seq_len": 512, "seed": 0},
                "evaluation": {"suite": "quick", "limit": 8}, "priority": 0}
KEEP_ALIVE_SECONDS = 15.0
SSE_EVENT = {"type": "object", "description": "one Server-Sent Event: data is a JSON object (message, ts, ...)",
             "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}}}

router = APIRouter(tags=["jobs"])


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


def last_event_id(header: str | None, after: int) -> int:
    if header is None:
        return after
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", header):
        raise QuantfarmError(f"Last-Event-ID must be an event id (a whole number below 10^18), not {shown(header)}")
    return int(header)


def get_job(store: Store, job_id: str) -> dict:
    job = store.get(resolve_id(store, "job", job_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def owner_or_admin(job: dict, who: Principal):
    if not who.can("admin") and job["submitted_by"] != who.name:
        raise Forbidden(f"job {job['id']} was submitted by {job['submitted_by']!r}; only they or an admin "
                        "may change it")


def view(store: Store, job: dict) -> Job:
    return Job.from_row(job, store.artifacts_of(job["id"]))


@router.post("/v1/jobs", status_code=201, response_model=Job,
             responses={200: {"model": Job, "description": "the same recipe exists: that job"},
                        **errors(413, 429, 503, 507)},
             openapi_extra={"requestBody": {"content": {"application/json": {"example": SPEC_EXAMPLE}}}})
def submit(spec: JobSpec, response: Response, force: bool = False, who: Principal = Depends(role("submit")),
           farm: Farm = Depends(current_farm)):
    """Queue a job once it has passed every check a worker would make first (the server's policy on remote
    code, pickle and local files; the format can hold the settings; memory; room for the artifact).
    The same recipe (spec less evaluation and scheduling, plus the pinned model revision) returns the
    existing job with 200 unless force=true, or unless that job failed or was cancelled. The token's quotas
    (quotas.py: jobs queued or running, highest priority) are checked first."""
    quotas.check(farm.store, who, priority=spec.priority)
    ok = farm.admit(spec, admin=who.can("admin"))
    submitter = Submitter(who.name, max_attempts=farm.settings.max_attempts)
    job, created = farm.store.queue(spec.model_dump(mode="json"), Submission.of(spec, ok, submitter), force=force)
    if not created:
        response.status_code = 200
    return view(farm.store, job)


@router.get("/v1/jobs", response_model=JobList, responses=errors())
def list_jobs(state: str | None = Query(None, max_length=20, description=" | ".join(STATES)),
              model: str | None = Query(None, max_length=300), limit: int = Query(50, ge=1, le=500),
              offset: int = Query(0, ge=0, le=10 ** 9), _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    if state is not None and state not in STATES:
        raise QuantfarmError(f"state must be one of {', '.join(STATES)}")
    no_nul(model=model)
    rows, total = farm.store.list_jobs(state, model, limit, offset)
    return {"jobs": [view(farm.store, j) for j in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/v1/jobs/{job_id}", response_model=Job, responses=errors(404))
def job(job_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    return view(farm.store, get_job(farm.store, job_id))


@router.get("/v1/jobs/{job_id}/events", response_class=EventStream,
            responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **errors(404)})
async def job_events(job_id: str, last_event: str | None = Header(None, alias="Last-Event-ID"),
                     after: int = Query(0, ge=0, le=10 ** 18), _=Depends(role("read")),
                     farm: Farm = Depends(current_farm)):
    """Server-Sent Events: every event of the job (state, step, layer, log) from `after` (or the
    Last-Event-ID header) on; the stream ends when the job does."""
    store, feed = farm.store, farm.feed
    start = last_event_id(last_event, after)
    job_id = (await run_in_threadpool(get_job, store, job_id))["id"]

    async def stream():
        last = start
        feed.subscribers += 1
        try:
            while True:
                seen = feed.latest
                new = await run_in_threadpool(store.events_after, job_id, last, 500)
                for ev in new:
                    last = ev["id"]
                    data = {"message": ev["message"], "ts": ev["ts"], **(ev["data"] or {})}
                    yield f"id: {ev['id']}\nevent: {ev['kind']}\ndata: {json.dumps(data)}\n\n"
                if new:
                    continue
                job_now = await run_in_threadpool(store.get, job_id)
                if job_now is None or job_now["state"] in TERMINAL:
                    if not await run_in_threadpool(store.events_after, job_id, last, 1):
                        return
                    continue
                if not await feed.wait_past(seen, KEEP_ALIVE_SECONDS):
                    yield ": keep-alive\n\n"
        finally:
            feed.subscribers -= 1
    return EventStream(stream(), headers={"Cache-Control": "no-cache"})


@router.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=errors(404))
def job_logs(job_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    job_id = get_job(farm.store, job_id)["id"]
    lines = [f"{iso(e['ts'])} {e['kind']:5s} {e['message']}"
             + "".join(f" ({k}: {e['data'][k]})" for k in ("reason", "worker", "attempt", "error")
                       if (e["data"] or {}).get(k) is not None)
             for e in farm.store.events_after(job_id, 0, 100000)]
    return PlainTextResponse("\n".join(lines) + "\n")


@router.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses=errors(404, 409))
def cancel(job_id: str, who: Principal = Depends(role("submit")), farm: Farm = Depends(current_farm)):
    job = get_job(farm.store, job_id)
    owner_or_admin(job, who)
    if job["state"] in TERMINAL:
        raise Conflict(f"job {job['id']} already ended ({job['state']}); nothing to cancel")
    return view(farm.store, farm.store.cancel(job["id"]))


@router.post("/v1/jobs/{job_id}/retry", response_model=Job, responses=errors(404, 409, 429))
def retry(job_id: str, who: Principal = Depends(role("submit")), farm: Farm = Depends(current_farm)):
    job = get_job(farm.store, job_id)
    owner_or_admin(job, who)
    if job["state"] not in ("failed", "failed_quality", "publish_failed", "cancelled"):
        raise Conflict(f"job {job['id']} is {job['state']}; only failed or cancelled jobs can be retried")
    quotas.check(farm.store, who)
    return view(farm.store, farm.store.retry(job["id"]))


@router.get("/v1/jobs/{job_id}/report", responses=errors(404))
def report(job_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    job = get_job(farm.store, job_id)
    arts = farm.store.artifacts_of(job["id"])
    rep = blobstore.read_report(arts[0]["path"]) if arts else None
    if rep is None:
        raise NotFound(f"job {job['id']} has no report yet (state {job['state']})")
    return JSONResponse(rep)
