"""The HTTP API (FastAPI, under /v1): submit, list, follow, cancel and retry jobs; download artifacts.

Submitting pins the model (a Hub revision becomes its commit sha, a local model its content hash),
so the recipe key names exactly one artifact: the same spec again returns the existing job (200)
unless `?force=true` (201, a new job), or unless that job failed or was cancelled (a new job). The
queue itself is the store; workers are other processes. Job, artifact, release and batch run ids may be
shortened to any unambiguous prefix of at least 4 characters (the CLI prints 8 or 12).
"""
import asyncio
import json
import logging
import os
import re
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from service.job import blobstore, storage
from evaluation import release_report
from service.job.release import ReleaseSpec
from service.job.spec import JobSpec

from . import admission, batch, quotas, releases
from .auth import Auth, AuthError, Forbidden, Principal
from . import docs, media
from .gate import BodyTooLarge, RequestGate
from core.errors import (ArtifactError, NotImplementedFeature, QuantfarmError, QuantizationError, SpecError, StorageError,
                         UnsafeModelError)
from .policy import Policy
from .store import STATES, TERMINAL, Store

log = logging.getLogger("quantfarm.api")

SPEC_EXAMPLE = {"model": "smollm2-135m", "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 64,
                "calibration": {"source": "auto", "samples": 128, "seq_len": 512, "seed": 0},
                "evaluation": {"suite": "quick", "limit": 8}, "priority": 0}
MAX_BODY_BYTES = 1 << 20
ID_PREFIX_MIN = 4
KEEP_ALIVE_SECONDS = 15.0


class NotFound(QuantfarmError):
    pass


class Conflict(QuantfarmError):
    pass


class StoreUnavailable(QuantfarmError):
    pass


# What each error answers over HTTP (the most specific class in an error's MRO wins; others: 400)
HTTP_STATUS = {AuthError: 401, Forbidden: 403, UnsafeModelError: 403, quotas.OverLimit: 403, NotFound: 404,
               Conflict: 409, BodyTooLarge: 413, quotas.QuotaExceeded: 429, SpecError: 422, QuantizationError: 500,
               NotImplementedFeature: 501, StoreUnavailable: 503, StorageError: 507}


def http_status(e: QuantfarmError) -> int:
    return next((HTTP_STATUS[c] for c in type(e).__mro__ if c in HTTP_STATUS), 400)


@dataclass
class FarmSettings:
    db_url: str
    home: Path
    auth: Auth
    lease_seconds: float = 30.0
    max_attempts: int = 3
    policy: Policy = field(default_factory=Policy)
    worker_memory_gb: float | None = None      # the largest local worker's budget (the store knows the others)
    schedule: Path | None = None               # a batch file fired on `cron` (serve --schedule/--cron)
    cron: str | None = None


# ---- documented response bodies ------------------------------------------------------------------

class Problem(BaseModel):
    detail: str
    errors: list[dict] | None = None


class Health(BaseModel):
    ok: bool
    problems: list[str] = []


class Progress(BaseModel):
    layers_done: int
    layers_total: int | None


class Timings(BaseModel):
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    seconds: dict | None


class ArtifactRef(BaseModel):
    id: str
    format: str
    published: bool
    size_bytes: int
    files: str


class Job(BaseModel):
    id: str
    state: str
    step: str | None
    progress: Progress
    model: str
    revision: str | None
    recipe_key: str
    priority: int
    attempt: int
    max_attempts: int
    memory_gb: float
    worker: str | None
    cancel_requested: bool
    error: str | None
    submitted_by: str | None
    timings: Timings
    result: dict | None
    artifacts: list[ArtifactRef]
    spec: dict
    links: dict[str, str]


class JobList(BaseModel):
    jobs: list[Job]
    total: int
    limit: int
    offset: int


class ArtifactFile(BaseModel):
    path: str
    url: str
    size_bytes: int


class ArtifactListing(BaseModel):
    id: str
    job_id: str
    path: str
    format: str
    size_bytes: int
    published: bool
    created_at: float
    files: list[ArtifactFile]


def errors(*codes: int) -> dict:
    """Documented error answers: JSON {"detail": ...} whatever the operation's own media type."""
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {c: {"model": Problem, "content": problem} for c in (400, 401, 403, 422, *codes)}


SSE_EVENT = {"type": "object", "description": "one Server-Sent Event: data is a JSON object (message, ts, ...)",
             "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}}}


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


class Download(FileResponse):
    """An artifact file with its own media type and headers (media.py): reports shown, weights downloaded."""
    media_type = media.OCTET

    def __init__(self, path, name: str, status_code: int = 200, **kw):
        super().__init__(path, status_code=status_code, media_type=media.media_type(name), headers=media.headers(name),
                         **kw)


# ---- helpers ---------------------------------------------------------------------------------------

def job_view(job: dict, store: Store) -> dict:
    base = f"/v1/jobs/{job['id']}"
    result = job.get("result") or {}
    arts = [{"id": a["id"], "format": a["format"], "published": a["published"], "size_bytes": a["size_bytes"],
             "files": f"/v1/artifacts/{a['id']}"} for a in store.artifacts_of(job["id"])]
    return {
        "id": job["id"], "state": job["state"], "step": job["step"],
        "progress": {"layers_done": job["layers_done"], "layers_total": job["layers_total"]},
        "model": job["model"], "revision": job["revision"], "recipe_key": job["recipe_key"],
        "priority": job["priority"], "attempt": job["attempt"], "max_attempts": job["max_attempts"],
        "memory_gb": job["memory_gb"], "worker": job["worker"], "cancel_requested": job["cancel_requested"],
        "error": job["error"], "submitted_by": job["submitted_by"],
        "timings": {"created_at": _iso(job["created_at"]), "started_at": _iso(job["started_at"]),
                    "finished_at": _iso(job["finished_at"]), "seconds": result.get("seconds")},
        "result": result or None, "artifacts": arts, "spec": job["spec"],
        "links": {"self": base, "events": f"{base}/events", "logs": f"{base}/logs", "report": f"{base}/report"},
    }


def _iso(ts):
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def no_nul(**params) -> None:
    """Query filters go into SQL text columns, which cannot hold NUL (PostgreSQL refuses it outright)."""
    for name, value in params.items():
        if value is not None and "\x00" in value:
            raise QuantfarmError(f"{name} must not contain a NUL character")


def _shown(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def resolve_id(store: Store, kind: str, given: str) -> str:
    """A full id, or the one id an unambiguous prefix (at least 4 hex characters) names."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", given):
        raise NotFound(f"no {kind} {_shown(given)}: ids are up to 32 hex characters")
    if len(given) < ID_PREFIX_MIN:
        raise QuantfarmError(f"{kind} id prefix {given!r} is too short: give at least {ID_PREFIX_MIN} characters")
    matches = store.ids_starting(kind, given)
    if not matches:
        raise NotFound(f"no {kind} {given}")
    if len(matches) > 1:
        shown = ", ".join(matches[:2]) + (", ..." if len(matches) > 2 else "")
        raise QuantfarmError(f"{kind} id prefix {given} matches several {kind}s ({shown}); give more characters")
    return matches[0]


def last_event_id(header: str | None, after: int) -> int:
    if header is None:
        return after
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", header):
        raise QuantfarmError(f"Last-Event-ID must be an event id (a whole number below 10^18), not {_shown(header)}")
    return int(header)


def store_problems(settings: FarmSettings, store: Store) -> list[str]:
    """Why the store cannot take writes now (empty: it can): the database answers, and the folders
    it and the artifacts are written to are writable with room left."""
    problems = []
    try:
        store.counts()
    except Exception as e:
        problems.append(f"the database does not answer ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    folders = [settings.home / "artifacts" / "probe"]
    if settings.db_url.startswith("sqlite:///"):
        folders.append(Path(settings.db_url[len("sqlite:///"):]).parent / "probe")
    for folder in folders:
        try:
            storage.check_writable(folder)
            storage.check_space(folder, 64 << 20)
        except StorageError as e:
            problems.append(str(e))
    return problems


def _metrics_registry(store: Store) -> CollectorRegistry:
    class Collector:
        def collect(self):
            counts = store.counts()
            yield GaugeMetricFamily("quantfarm_queue_depth", "jobs waiting for a worker", value=counts.get("queued", 0))
            yield GaugeMetricFamily("quantfarm_jobs_running", "jobs running now", value=counts.get("running", 0))
            jobs = GaugeMetricFamily("quantfarm_jobs", "jobs by state", labels=["state"])
            for s in STATES:
                jobs.add_metric([s], counts.get(s, 0))
            yield jobs
            yield CounterMetricFamily("quantfarm_job_failures", "jobs that ended failed, failed_quality or publish_failed",
                                      value=sum(counts.get(s, 0) for s in ("failed", "failed_quality", "publish_failed")))
            durations = store.durations()
            bounds = [10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, float("inf")]
            buckets = [(str(b) if b != float("inf") else "+Inf", sum(d <= b for d in durations)) for b in bounds]
            yield HistogramMetricFamily("quantfarm_job_duration_seconds", "wall time of succeeded jobs",
                                        buckets=buckets, sum_value=sum(durations))
            t = batch.totals(store)
            for name, what in (("runs", "finished batch runs"), ("built", "variants built by batch runs"),
                               ("skipped", "variants batch runs found built for the same revision"),
                               ("failed", "variants (or models) batch runs could not build or publish"),
                               ("regressed", "variants whose recovery fell past the gate against the previous release")):
                yield CounterMetricFamily(f"quantfarm_batch_{name}", what, value=t[name])

    reg = CollectorRegistry()
    reg.register(Collector())
    return reg


class EventFeed:
    """One poller for every open event stream: while any is open it reads the newest event id (one small
    query, however many streams) and wakes the streams when it moves; each then reads its own job's
    events. Streams wait on the event loop, so they hold no request thread."""

    def __init__(self, store: Store, interval: float = 0.25):
        self.store, self.interval = store, interval
        self.latest, self.subscribers = -1, 0
        self.changed = asyncio.Event()

    async def run(self):
        while True:
            if self.subscribers:
                try:
                    latest = await run_in_threadpool(self.store.latest_event_id)
                except Exception as e:
                    log.warning("event feed: %s", e)
                    latest = self.latest
                if latest != self.latest:
                    self.latest = latest
                    woken, self.changed = self.changed, asyncio.Event()
                    woken.set()
            await asyncio.sleep(self.interval)

    async def wait_past(self, seen: int, timeout: float) -> bool:
        """Until the newest event id differs from `seen` (True) or `timeout` passes (False)."""
        if self.latest != seen:
            return True
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


# ---- the app -------------------------------------------------------------------------------------------

def create_app(settings: FarmSettings) -> FastAPI:
    store = Store(settings.db_url, settings.lease_seconds)
    registry = _metrics_registry(store)
    feed = EventFeed(store)
    artifact_root = settings.home / "artifacts"
    threading.Thread(target=admission.warm_up, daemon=True, name="warm-up").start()

    scheduler = None
    if settings.schedule is not None:
        scheduler = batch.Scheduler(store, settings.schedule, settings.cron or "0 2 * * *", home=settings.home,
                                    pin=lambda rs: admission.pin(rs, admin=True, policy=settings.policy),
                                    admit=lambda job, src: admission.admit(
                                        job, admin=True, policy=settings.policy, artifact_root=artifact_root,
                                        worker_memory_gb=largest_worker_gb(), src=src))

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(feed.run())
        if scheduler is not None:
            scheduler.start()
        yield
        task.cancel()
        if scheduler is not None:
            scheduler.stop()

    app = FastAPI(title="quantfarm", version="1", description=__doc__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGate, auth=settings.auth, max_body=MAX_BODY_BYTES, status=http_status)   # gate.py

    @app.exception_handler(QuantfarmError)
    async def _quantfarm_error(_req, e: QuantfarmError):
        status = http_status(e)
        return JSONResponse({"detail": str(e)}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    @app.exception_handler(OperationalError)
    async def _store_down(_req, e: OperationalError):
        log.error("store error: %s", e)
        return JSONResponse({"detail": f"the job store cannot be used right now ({str(e.orig)[:200]}); retry "
                                       "shortly, and see GET /healthz"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = [{"field": ".".join(str(x) for x in err["loc"] if x != "body"), "message": err["msg"]}
                for err in e.errors()]
        text = "; ".join(f"{x['field'] or 'body'}: {x['message']}" for x in errs)
        return JSONResponse({"detail": f"invalid request: {text}", "errors": errs}, status_code=422)

    def role(needed: str, part: str | None = None):
        def dep(request: Request, _=Depends(docs.BEARER)) -> Principal:      # BEARER: the schema's security scheme
            return settings.auth.check(request.headers.get("authorization"), needed, part)
        return dep

    def largest_worker_gb() -> float | None:
        """The largest budget among this server's own workers and those seen alive in the store lately
        (remote `quantfarm worker`s included); None when no worker is known."""
        seen = store.largest_worker_gb(within_seconds=3 * settings.lease_seconds)
        known = [gb for gb in (seen, settings.worker_memory_gb) if gb is not None]
        return max(known) if known else None

    def get_job(job_id: str) -> dict:
        job = store.get(resolve_id(store, "job", job_id))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def owner_or_admin(job: dict, who: Principal):
        if not who.can("admin") and job["submitted_by"] != who.name:
            raise Forbidden(f"job {job['id']} was submitted by {job['submitted_by']!r}; only they or an admin "
                            "may change it")

    # ---- operations and documentation

    @app.get("/v1/healthz", tags=["ops"], response_model=Health, responses={503: {"model": Health}})
    @app.get("/healthz", include_in_schema=False)
    def healthz():
        """200 when the store answers and can take writes; 503 (degraded) naming what is wrong otherwise."""
        problems = store_problems(settings, store)
        return JSONResponse({"ok": not problems, "problems": problems}, status_code=503 if problems else 200)

    @app.get("/v1/metrics", tags=["ops"], response_class=PlainTextResponse, responses=errors())
    @app.get("/metrics", include_in_schema=False)
    def metrics(_=Depends(role("read", "metrics"))):
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    docs.add_routes(app, role("read", "docs"))        # /docs open to all, /openapi.json a read unless public

    # ---- jobs

    @app.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=Job,
              responses={200: {"model": Job, "description": "the same recipe exists: that job"},
                         **errors(413, 429, 503, 507)},
              openapi_extra={"requestBody": {"content": {"application/json": {"example": SPEC_EXAMPLE}}}})
    def submit(spec: JobSpec, response: Response, force: bool = False, who: Principal = Depends(role("submit"))):
        """Queue a job once it has passed every check a worker would make first (the server's policy on remote
        code, pickle and local files; the format can hold the settings; memory; room for the artifact).
        The same recipe (spec less evaluation and scheduling, plus the pinned model revision) returns the
        existing job with 200 unless force=true, or unless that job failed or was cancelled. The token's quotas
        (quotas.py: jobs queued or running, highest priority) are checked first."""
        quotas.check(store, who, priority=spec.priority)
        ok = admission.admit(spec, admin=who.can("admin"), policy=settings.policy, artifact_root=artifact_root,
                             worker_memory_gb=largest_worker_gb())
        job, created = store.submit(spec.model_dump(mode="json"), spec.recipe_key(ok.revision), spec.model,
                                    ok.revision, priority=spec.priority, memory_gb=ok.memory_gb,
                                    max_attempts=settings.max_attempts, submitted_by=who.name, force=force)
        if not created:
            response.status_code = 200
        return job_view(job, store)

    @app.get("/v1/jobs", tags=["jobs"], response_model=JobList, responses=errors())
    def list_jobs(state: str | None = Query(None, max_length=20, description=" | ".join(STATES)),
                  model: str | None = Query(None, max_length=300), limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0, le=10 ** 9), _=Depends(role("read"))):
        if state is not None and state not in STATES:
            raise QuantfarmError(f"state must be one of {', '.join(STATES)}")
        no_nul(model=model)
        rows, total = store.list_jobs(state, model, limit, offset)
        return {"jobs": [job_view(j, store) for j in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=Job, responses=errors(404))
    def job(job_id: str, _=Depends(role("read"))):
        return job_view(get_job(job_id), store)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=EventStream,
             responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **errors(404)})
    async def job_events(job_id: str, last_event: str | None = Header(None, alias="Last-Event-ID"),
                         after: int = Query(0, ge=0, le=10 ** 18), _=Depends(role("read"))):
        """Server-Sent Events: every event of the job (state, step, layer, log) from `after` (or the
        Last-Event-ID header) on; the stream ends when the job does."""
        start = last_event_id(last_event, after)
        job_id = (await run_in_threadpool(get_job, job_id))["id"]

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

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse, responses=errors(404))
    def job_logs(job_id: str, _=Depends(role("read"))):
        job_id = get_job(job_id)["id"]
        lines = [f"{_iso(e['ts'])} {e['kind']:5s} {e['message']}"
                 + "".join(f" ({k}: {e['data'][k]})" for k in ("reason", "worker", "attempt", "error")
                           if (e["data"] or {}).get(k) is not None)
                 for e in store.events_after(job_id, 0, 100000)]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=Job, responses=errors(404, 409))
    def cancel(job_id: str, who: Principal = Depends(role("submit"))):
        job = get_job(job_id)
        owner_or_admin(job, who)
        if job["state"] in TERMINAL:
            raise Conflict(f"job {job['id']} already ended ({job['state']}); nothing to cancel")
        return job_view(store.cancel(job["id"]), store)

    @app.post("/v1/jobs/{job_id}/retry", tags=["jobs"], response_model=Job, responses=errors(404, 409, 429))
    def retry(job_id: str, who: Principal = Depends(role("submit"))):
        job = get_job(job_id)
        owner_or_admin(job, who)
        if job["state"] not in ("failed", "failed_quality", "publish_failed", "cancelled"):
            raise Conflict(f"job {job['id']} is {job['state']}; only failed or cancelled jobs can be retried")
        quotas.check(store, who)
        return job_view(store.retry(job["id"]), store)

    @app.get("/v1/jobs/{job_id}/report", tags=["jobs"], responses=errors(404))
    def report(job_id: str, _=Depends(role("read"))):
        job = get_job(job_id)
        arts = store.artifacts_of(job["id"])
        rep = blobstore.read_report(arts[0]["path"]) if arts else None
        if rep is None:
            raise NotFound(f"job {job['id']} has no report yet (state {job['state']})")
        return JSONResponse(rep)

    # ---- releases

    def admit(spec, src, who: Principal):
        return admission.admit(spec, admin=who.can("admin"), policy=settings.policy, artifact_root=artifact_root,
                               worker_memory_gb=largest_worker_gb(), src=src)

    def get_release(release_id: str) -> dict:
        view = releases.get(store, resolve_id(store, "release", release_id))
        if view is None:
            raise NotFound(f"no release {_shown(release_id)}")
        return view

    @app.post("/v1/releases", tags=["releases"], status_code=201, responses=errors(413, 429, 503, 507))
    def submit_release(spec: ReleaseSpec, who: Principal = Depends(role("submit"))):
        """Queue every variant of a release (a preset or a list) once all pass the checks a single job
        passes; a variant whose recipe was built before links that job instead of queueing a new one.
        The source is pinned once, so every variant is of the same revision."""
        return releases.submit(store, spec, pin=lambda rs: admission.pin(rs, admin=who.can("admin"),
                                                                         policy=settings.policy),
                               admit=lambda job, src: admit(job, src, who), submitted_by=who.name,
                               max_attempts=settings.max_attempts,
                               limit=lambda n: quotas.check(store, who, jobs=n, priority=spec.priority, release=True))

    @app.get("/v1/releases", tags=["releases"], responses=errors())
    def list_releases(model: str | None = Query(None, max_length=300), limit: int = Query(20, ge=1, le=200),
                      offset: int = Query(0, ge=0, le=10 ** 9), _=Depends(role("read"))):
        no_nul(model=model)
        rows, total = releases.list_(store, model, limit, offset)
        return {"releases": rows, "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/releases/{release_id}", tags=["releases"], responses=errors(404))
    def release(release_id: str, _=Depends(role("read"))):
        """The release's state and one row per variant: size, bits per weight, perplexity, KLD, recovery and
        the runtimes that load it (from each finished variant's report)."""
        return get_release(release_id)

    @app.get("/v1/releases/{release_id}/README.md", tags=["releases"], response_class=PlainTextResponse,
             responses=errors(404))
    def release_readme(release_id: str, _=Depends(role("read"))):
        return PlainTextResponse(release_report.readme(get_release(release_id)), media_type=media.media_type("README.md"),
                                 headers=media.headers("README.md"))

    @app.get("/v1/releases/{release_id}/index.html", tags=["releases"], response_class=HTMLResponse,
             responses=errors(404))
    def release_page(release_id: str, _=Depends(role("read"))):
        return HTMLResponse(release_report.html_page(get_release(release_id)), headers=media.headers("index.html"))

    # ---- batch runs

    @app.get("/v1/batches", tags=["batches"], responses=errors())
    def list_batches(batch_name: str | None = Query(None, alias="batch", max_length=200),
                     limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=10 ** 9),
                     _=Depends(role("read"))):
        """Nightly batch runs, newest first, with their counts (built, skipped, failed, regressed) once done."""
        no_nul(batch=batch_name)
        rows, total = batch.list_runs(store, batch_name, limit, offset)
        return {"runs": rows, "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/batches/{run_id}", tags=["batches"], responses=errors(404))
    def batch_run(run_id: str, _=Depends(role("read"))):
        """A run's night report: per model, new revision or unchanged; per variant, recovery against the
        model's previous release (regressions flagged); failures with their reasons."""
        rep = batch.finalize(store, resolve_id(store, "batch run", run_id), settings.home)
        if rep is None:
            raise NotFound(f"no batch run {_shown(run_id)}")
        return rep

    # ---- artifacts

    @app.get("/v1/artifacts/{artifact_id}", tags=["artifacts"], response_model=ArtifactListing,
             responses=errors(404))
    def artifact_files(artifact_id: str, _=Depends(role("read"))):
        art = _artifact(store, artifact_id)
        aid = art["id"]
        if blobstore.is_url(art["path"]):
            bs, key = blobstore.at(art["path"])
            files = bs.files(key)
        else:
            files = artifact_listing(Path(art["path"]))
        return {**art, "files": [{"path": f, "url": f"/v1/artifacts/{aid}/files/{f}", "size_bytes": size}
                                 for f, size in files]}

    @app.get("/v1/artifacts/{artifact_id}/files/{path:path}", tags=["artifacts"], response_class=Download,
             responses={200: {"content": media.DOCUMENTED}, **errors(404)})
    def artifact_file(artifact_id: str, path: str, _=Depends(role("read"))):
        art = _artifact(store, artifact_id)
        if blobstore.is_url(art["path"]):              # streamed from the storage, names checked against its listing
            bs, key = blobstore.at(art["path"])
            if path not in {f for f, _ in bs.files(key)}:
                raise NotFound(f"artifact {art['id']} has no file {_shown(path)}")
            return StreamingResponse(_chunks(bs.open(key, path)), media_type=media.media_type(path),
                                     headers=media.headers(path))
        return Download(artifact_path(Path(art["path"]), path, art["id"]), path)

    return app


def _artifact(store: Store, artifact_id: str) -> dict:
    art = store.artifact(resolve_id(store, "artifact", artifact_id))
    if art is None:
        raise NotFound(f"no artifact {artifact_id}")
    if not blobstore.is_url(art["path"]) and not Path(art["path"]).is_dir():
        raise ArtifactError(f"artifact {art['id']}'s folder {art['path']} is gone from the artifact store")
    return art


def _chunks(f, size: int = 1 << 20):
    with f:
        while chunk := f.read(size):
            yield chunk


def artifact_listing(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of the regular files in an artifact folder; symlinks are neither followed
    nor listed, so no loop or link out of the folder shows up."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink() and p.is_file():
                out.append((str(p.relative_to(root)), p.stat().st_size))
    return sorted(out)


def artifact_path(root: Path, path: str, artifact_id: str) -> Path:
    """The file `path` names inside the artifact folder `root`; 404 for anything else (outside the folder,
    a link out of it, a loop, NUL bytes, over-long names)."""
    missing = NotFound(f"artifact {artifact_id} has no file {_shown(path)}")
    if "\x00" in path or len(path) > 1024 or path.count("/") > 32:
        raise missing
    try:
        root = root.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or target == root or not target.is_file():
            raise missing
    except (OSError, RuntimeError, ValueError):
        raise missing from None
    return target
