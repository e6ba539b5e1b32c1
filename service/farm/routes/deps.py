"""What every router shares: the farm's state on `app.state.farm` (settings, store, event feed, metrics), the
caller's role as a dependency, short ids, and the errors the routes raise (api.py maps them to statuses)."""
import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from core.errors import QuantfarmError

from .. import admission, docs
from ..auth import Auth, Principal
from ..policy import Policy
from ..schemas import Problem
from ..store import Store

log = logging.getLogger("quantfarm.api")

ID_PREFIX_MIN = 4


class NotFound(QuantfarmError):
    pass


class Conflict(QuantfarmError):
    pass


class StoreUnavailable(QuantfarmError):
    pass


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


@dataclass
class Farm:
    """One app's state, shared by its routes: `feed` wakes the job event streams, `metrics` is the registry
    /metrics reads (ops.metrics_registry)."""
    settings: FarmSettings
    store: Store
    feed: EventFeed
    metrics: CollectorRegistry

    @property
    def artifact_root(self) -> Path:
        return self.settings.home / "artifacts"

    def largest_worker_gb(self) -> float | None:
        """The largest budget among this server's own workers and those seen alive in the store lately
        (remote `quantfarm worker`s included); None when no worker is known."""
        seen = self.store.largest_worker_gb(within_seconds=3 * self.settings.lease_seconds)
        known = [gb for gb in (seen, self.settings.worker_memory_gb) if gb is not None]
        return max(known) if known else None

    def pin(self, spec, admin: bool):
        """The server's policy on a JobSpec's or ReleaseSpec's source, then the source pinned (admission.pin)."""
        return admission.pin(spec, admin=admin, policy=self.settings.policy)

    def admit(self, spec, admin: bool, src=None) -> admission.Admitted:
        """Every check a job passes before it is queued, with this server's policy, artifact folder and workers."""
        return admission.admit(spec, admin=admin, policy=self.settings.policy, artifact_root=self.artifact_root,
                               worker_memory_gb=self.largest_worker_gb(), src=src)


async def current_farm(request: Request) -> Farm:
    return request.app.state.farm


def role(needed: str, part: str | None = None):
    """A dependency: the caller's Principal, refused (401/403) unless its token has the `needed` role (or
    `part` of the API is public in the tokens file)."""
    def dep(request: Request, _=Depends(docs.BEARER)) -> Principal:      # BEARER: the schema's security scheme
        return request.app.state.farm.settings.auth.check(request.headers.get("authorization"), needed, part)
    return dep


def errors(*codes: int) -> dict:
    """Documented error answers: JSON {"detail": ...} whatever the operation's own media type."""
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {c: {"model": Problem, "content": problem} for c in (400, 401, 403, 422, *codes)}


def no_nul(**params) -> None:
    """Query filters go into SQL text columns, which cannot hold NUL (PostgreSQL refuses it outright)."""
    for name, value in params.items():
        if value is not None and "\x00" in value:
            raise QuantfarmError(f"{name} must not contain a NUL character")


def shown(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def resolve_id(store: Store, kind: str, given: str) -> str:
    """A full id, or the one id an unambiguous prefix (at least 4 hex characters) names."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", given):
        raise NotFound(f"no {kind} {shown(given)}: ids are up to 32 hex characters")
    if len(given) < ID_PREFIX_MIN:
        raise QuantfarmError(f"{kind} id prefix {given!r} is too short: give at least {ID_PREFIX_MIN} characters")
    matches = store.ids_starting(kind, given)
    if not matches:
        raise NotFound(f"no {kind} {given}")
    if len(matches) > 1:
        listed = ", ".join(matches[:2]) + (", ..." if len(matches) > 2 else "")
        raise QuantfarmError(f"{kind} id prefix {given} matches several {kind}s ({listed}); give more characters")
    return matches[0]
