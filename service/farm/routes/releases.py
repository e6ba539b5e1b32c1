"""/v1/releases: submit a release (every variant of one model), list them, and a release's table as JSON,
README.md and index.html."""
from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, PlainTextResponse

from evaluation import release_report
from service.job.release import ReleaseSpec

from .. import media, quotas, releases
from ..auth import Principal
from ..store import Submitter
from .deps import Farm, NotFound, current_farm, errors, no_nul, resolve_id, role, shown

router = APIRouter(tags=["releases"])


def get_release(farm: Farm, release_id: str) -> dict:
    view = releases.get(farm.store, resolve_id(farm.store, "release", release_id))
    if view is None:
        raise NotFound(f"no release {shown(release_id)}")
    return view


@router.post("/v1/releases", status_code=201, responses=errors(413, 429, 503, 507))
def submit_release(spec: ReleaseSpec, who: Principal = Depends(role("submit")), farm: Farm = Depends(current_farm)):
    """Queue every variant of a release (a preset or a list) once all pass the checks a single job
    passes; a variant whose recipe was built before links that job instead of queueing a new one.
    The source is pinned once, so every variant is of the same revision."""
    admin = who.can("admin")
    checks = releases.ReleaseChecks(
        pin=lambda rs: farm.pin(rs, admin=admin), admit=lambda job, src: farm.admit(job, admin=admin, src=src),
        limit=lambda n: quotas.check(farm.store, who, jobs=n, priority=spec.priority, release=True))
    return releases.submit(farm.store, spec, checks, Submitter(who.name, max_attempts=farm.settings.max_attempts))


@router.get("/v1/releases", responses=errors())
def list_releases(model: str | None = Query(None, max_length=300), limit: int = Query(20, ge=1, le=200),
                  offset: int = Query(0, ge=0, le=10 ** 9), _=Depends(role("read")),
                  farm: Farm = Depends(current_farm)):
    no_nul(model=model)
    rows, total = releases.list_(farm.store, model, limit, offset)
    return {"releases": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/v1/releases/{release_id}", responses=errors(404))
def release(release_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    """The release's state and one row per variant: size, bits per weight, perplexity, KLD, recovery and
    the runtimes that load it (from each finished variant's report)."""
    return get_release(farm, release_id)


@router.get("/v1/releases/{release_id}/README.md", response_class=PlainTextResponse, responses=errors(404))
def release_readme(release_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    return PlainTextResponse(release_report.readme(get_release(farm, release_id)),
                             media_type=media.media_type("README.md"), headers=media.headers("README.md"))


@router.get("/v1/releases/{release_id}/index.html", response_class=HTMLResponse, responses=errors(404))
def release_page(release_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    return HTMLResponse(release_report.html_page(get_release(farm, release_id)), headers=media.headers("index.html"))
