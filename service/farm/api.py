"""The HTTP API (FastAPI, under /v1): submit, list, follow, cancel and retry jobs; download artifacts.

Submitting pins the model (a Hub revision becomes its commit sha, a local model its content hash),
so the recipe key names exactly one artifact: the same spec again returns the existing job (200)
unless `?force=true` (201, a new job), or unless that job failed or was cancelled (a new job). The
queue itself is the store; workers are other processes. Job, artifact, release and batch run ids may be
shortened to any unambiguous prefix of at least 4 characters (the CLI prints 8 or 12).
"""
import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from core.errors import NotImplementedFeature, QuantfarmError, QuantizationError, SpecError, StorageError, UnsafeModelError

from . import admission, batch, docs, quotas
from .auth import AuthError, Forbidden
from .gate import BodyTooLarge, RequestGate
from .routes import artifacts, batches, jobs, ops, releases
from .routes.deps import Conflict, EventFeed, Farm, FarmSettings, NotFound, StoreUnavailable, role
from .store import Store

__all__ = ["FarmSettings", "create_app", "http_status"]     # FarmSettings: serve and the tests build it from here

log = logging.getLogger("quantfarm.api")

MAX_BODY_BYTES = 1 << 20

# What each error answers over HTTP (the most specific class in an error's MRO wins; others: 400)
HTTP_STATUS = {AuthError: 401, Forbidden: 403, UnsafeModelError: 403, quotas.OverLimit: 403, NotFound: 404,
               Conflict: 409, BodyTooLarge: 413, quotas.QuotaExceeded: 429, SpecError: 422, QuantizationError: 500,
               NotImplementedFeature: 501, StoreUnavailable: 503, StorageError: 507}


def http_status(e: QuantfarmError) -> int:
    return next((HTTP_STATUS[c] for c in type(e).__mro__ if c in HTTP_STATUS), 400)


def create_app(settings: FarmSettings) -> FastAPI:
    """The app: the routers by resource, on one Farm (app.state.farm: the store, the event feed, the metrics),
    behind the request gate (gate.py), with errors answered as JSON {"detail": ...}."""
    store = Store(settings.db_url, settings.lease_seconds)
    farm = Farm(settings, store, EventFeed(store), ops.metrics_registry(store))
    threading.Thread(target=admission.warm_up, daemon=True, name="warm-up").start()

    scheduler = None
    if settings.schedule is not None:
        scheduler = batch.Scheduler(store, settings.schedule, settings.cron or "0 2 * * *", home=settings.home,
                                    pin=lambda rs: farm.pin(rs, admin=True),
                                    admit=lambda job, src: farm.admit(job, admin=True, src=src))

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(farm.feed.run())
        if scheduler is not None:
            scheduler.start()
        yield
        task.cancel()
        if scheduler is not None:
            scheduler.stop()

    app = FastAPI(title="quantfarm", version="1", description=__doc__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.farm = farm
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

    app.include_router(ops.router)
    docs.add_routes(app, role("read", "docs"))        # /docs open to all, /openapi.json a read unless public
    for resource in (jobs, releases, batches, artifacts):
        app.include_router(resource.router)
    return app
