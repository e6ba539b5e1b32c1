"""The HTTP API (FastAPI, under /v1): submit, list, follow, cancel and retry jobs; download artifacts.

Submitting pins the model (a Hub revision becomes its commit sha, a local model its content hash),
so the recipe key names exactly one artifact: the same spec again returns the existing job (200)
unless `?force=true` (201, a new job). The queue itself is the store; workers are other processes.
"""
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .auth import Auth, Forbidden, Principal
from .errors import ArtifactError, QuantfarmError
from .sources import resolve_model
from .spec import JobSpec
from .store import STATES, TERMINAL, Store

SPEC_EXAMPLE = {"model": "smollm2-135m", "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 128,
                "calibration": {"source": "auto", "samples": 128, "seq_len": 512, "seed": 0},
                "evaluation": {"suite": "quick", "limit": 8}, "priority": 0}


class NotFound(QuantfarmError):
    http_status = 404


class Conflict(QuantfarmError):
    http_status = 409


@dataclass
class Settings:
    db_url: str
    home: Path
    auth: Auth
    lease_seconds: float = 30.0
    max_attempts: int = 3


def estimate_memory_gb(src, spec: JobSpec) -> float:
    return _estimate(src.path, src.gguf_file, src.content_hash, spec.calibration.samples, spec.calibration.seq_len)


@lru_cache(maxsize=256)
def _estimate(path: str, gguf_file: str | None, _content_hash: str, samples: int, seq_len: int) -> float:
    """GPU memory a job needs: one decoder layer in float32 with GPTQ's working copies, the calibration
    activations (in, out and replayed outputs, 16-bit) and the widest Hessian. The model itself stays
    in host memory (the driver moves one layer at a time)."""
    from transformers import AutoConfig
    try:
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True, **kw)
        cfg = getattr(cfg, "text_config", cfg)
        h, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    except Exception:
        return 0.0
    layer = 4 * h * h + 3 * h * inter
    tokens = samples * seq_len
    need = layer * 4 * 3 + tokens * h * 2 * 4 + tokens * inter * 2 + 2 * inter * inter * 4
    return round(need / 2 ** 30 + 1.0, 2)


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
            yield CounterMetricFamily("quantfarm_job_failures", "jobs that ended failed or failed_quality",
                                      value=counts.get("failed", 0) + counts.get("failed_quality", 0))
            durations = store.durations()
            bounds = [10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, float("inf")]
            buckets = [(str(b) if b != float("inf") else "+Inf", sum(d <= b for d in durations)) for b in bounds]
            yield HistogramMetricFamily("quantfarm_job_duration_seconds", "wall time of succeeded jobs",
                                        buckets=buckets, sum_value=sum(durations))

    reg = CollectorRegistry()
    reg.register(Collector())
    return reg


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.db_url, settings.lease_seconds)
    app = FastAPI(title="quantfarm", version="1", description=__doc__)
    registry = _metrics_registry(store)

    @app.exception_handler(QuantfarmError)
    async def _quantfarm_error(_req, e: QuantfarmError):
        return JSONResponse({"detail": str(e)}, status_code=e.http_status,
                            headers={"WWW-Authenticate": "Bearer"} if e.http_status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = [{"field": ".".join(str(x) for x in err["loc"] if x != "body"), "message": err["msg"]}
                for err in e.errors()]
        text = "; ".join(f"{x['field'] or 'body'}: {x['message']}" for x in errs)
        return JSONResponse({"detail": f"invalid job spec: {text}", "errors": errs}, status_code=422)

    def role(needed: str):
        def dep(authorization: str | None = Header(None)) -> Principal:
            return settings.auth.check(authorization, needed)
        return dep

    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def owner_or_admin(job: dict, who: Principal):
        if not who.can("admin") and job["submitted_by"] != who.name:
            raise Forbidden(f"job {job['id']} was submitted by {job['submitted_by']!r}; only they or an admin "
                            "may change it")

    @app.get("/v1/healthz", tags=["ops"])
    @app.get("/healthz", include_in_schema=False)
    def healthz():
        store.counts()          # the database answers
        return {"ok": True}

    @app.get("/v1/metrics", tags=["ops"], response_class=PlainTextResponse)
    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/jobs", tags=["jobs"], status_code=201,
              openapi_extra={"requestBody": {"content": {"application/json": {"example": SPEC_EXAMPLE}}}})
    def submit(spec: JobSpec, response: Response, force: bool = False, who: Principal = Depends(role("submit"))):
        """Queue a job; the same recipe (spec less evaluation and scheduling, plus the pinned model revision)
        returns the existing job with 200 unless force=true."""
        src = resolve_model(spec.model, spec.revision, allow_pickle=spec.allow_pickle,
                            trust_remote_code=spec.trust_remote_code)
        revision = src.revision or src.content_hash
        job, created = store.submit(spec.model_dump(mode="json"), spec.recipe_key(revision), spec.model, revision,
                                    priority=spec.priority, memory_gb=estimate_memory_gb(src, spec),
                                    max_attempts=settings.max_attempts, submitted_by=who.name, force=force)
        if not created:
            response.status_code = 200
        return job_view(job, store)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(state: str | None = Query(None, description=" | ".join(STATES)), model: str | None = None,
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0), _=Depends(role("read"))):
        if state is not None and state not in STATES:
            raise QuantfarmError(f"state must be one of {', '.join(STATES)}")
        rows, total = store.list_jobs(state, model, limit, offset)
        return {"jobs": [job_view(j, store) for j in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def job(job_id: str, _=Depends(role("read"))):
        return job_view(get_job(job_id), store)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    def job_events(job_id: str, request: Request, after: int = 0, _=Depends(role("read"))):
        """Server-Sent Events: every event of the job (state, step, layer, log) from `after` (or the
        Last-Event-ID header) on; the stream ends when the job does."""
        get_job(job_id)
        last = int(request.headers.get("last-event-id") or after)

        def stream():
            nonlocal last
            idle = 0.0
            while True:
                new = store.events_after(job_id, last)
                for ev in new:
                    last = ev["id"]
                    data = {"message": ev["message"], "ts": ev["ts"], **(ev["data"] or {})}
                    yield f"id: {ev['id']}\nevent: {ev['kind']}\ndata: {json.dumps(data)}\n\n"
                if not new:
                    if store.get(job_id)["state"] in TERMINAL and not store.events_after(job_id, last):
                        return
                    time.sleep(0.3)
                    idle += 0.3
                    if idle >= 15:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                else:
                    idle = 0.0
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse)
    def job_logs(job_id: str, _=Depends(role("read"))):
        get_job(job_id)
        lines = [f"{_iso(e['ts'])} {e['kind']:5s} {e['message']}"
                 + "".join(f" ({k}: {e['data'][k]})" for k in ("reason", "worker", "attempt", "error")
                           if (e["data"] or {}).get(k) is not None)
                 for e in store.events_after(job_id, 0, 100000)]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: str, who: Principal = Depends(role("submit"))):
        job = get_job(job_id)
        owner_or_admin(job, who)
        if job["state"] in TERMINAL:
            raise Conflict(f"job {job_id} already ended ({job['state']}); nothing to cancel")
        return job_view(store.cancel(job_id), store)

    @app.post("/v1/jobs/{job_id}/retry", tags=["jobs"])
    def retry(job_id: str, who: Principal = Depends(role("submit"))):
        job = get_job(job_id)
        owner_or_admin(job, who)
        if job["state"] not in ("failed", "failed_quality", "cancelled"):
            raise Conflict(f"job {job_id} is {job['state']}; only failed or cancelled jobs can be retried")
        return job_view(store.retry(job_id), store)

    @app.get("/v1/jobs/{job_id}/report", tags=["jobs"])
    def report(job_id: str, _=Depends(role("read"))):
        job = get_job(job_id)
        arts = store.artifacts_of(job_id)
        path = Path(arts[0]["path"]) / "report.json" if arts else None
        if path is None or not path.is_file():
            raise NotFound(f"job {job_id} has no report yet (state {job['state']})")
        return JSONResponse(json.loads(path.read_text()))

    @app.get("/v1/artifacts/{artifact_id}", tags=["artifacts"])
    def artifact_files(artifact_id: str, _=Depends(role("read"))):
        art = _artifact(store, artifact_id)
        root = Path(art["path"])
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return {**art, "files": [{"path": f, "url": f"/v1/artifacts/{artifact_id}/files/{f}",
                                  "size_bytes": (root / f).stat().st_size} for f in files]}

    @app.get("/v1/artifacts/{artifact_id}/files/{path:path}", tags=["artifacts"])
    def artifact_file(artifact_id: str, path: str, _=Depends(role("read"))):
        root = Path(_artifact(store, artifact_id)["path"]).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or target == root:
            raise QuantfarmError(f"path {path!r} leaves the artifact folder")
        if not target.is_file():
            raise NotFound(f"artifact {artifact_id} has no file {path!r}")
        return FileResponse(target)

    return app


def _artifact(store: Store, artifact_id: str) -> dict:
    art = store.artifact(artifact_id)
    if art is None:
        raise NotFound(f"no artifact {artifact_id}")
    if not Path(art["path"]).is_dir():
        raise ArtifactError(f"artifact {artifact_id}'s folder {art['path']} is gone from the artifact store")
    return art
