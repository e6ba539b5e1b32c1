"""Operations: health (/v1/healthz, /healthz) and Prometheus metrics (/v1/metrics, /metrics)."""
from pathlib import Path

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from core.errors import StorageError
from service.job import storage

from .. import batch
from ..schemas import Health
from ..store import STATES, Store
from .deps import Farm, FarmSettings, current_farm, errors, role

router = APIRouter(tags=["ops"])


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


def metrics_registry(store: Store) -> CollectorRegistry:
    """A registry whose collector reads the store at every scrape: queue, job states, durations, batch runs."""
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


@router.get("/v1/healthz", response_model=Health, responses={503: {"model": Health}})
@router.get("/healthz", include_in_schema=False)
def healthz(farm: Farm = Depends(current_farm)):
    """200 when the store answers and can take writes; 503 (degraded) naming what is wrong otherwise."""
    problems = store_problems(farm.settings, farm.store)
    return JSONResponse({"ok": not problems, "problems": problems}, status_code=503 if problems else 200)


@router.get("/v1/metrics", response_class=PlainTextResponse, responses=errors())
@router.get("/metrics", include_in_schema=False)
def metrics(_=Depends(role("read", "metrics")), farm: Farm = Depends(current_farm)):
    return Response(generate_latest(farm.metrics), media_type="text/plain; version=0.0.4")
