"""/v1/batches: nightly batch runs and their night reports."""
from fastapi import APIRouter, Depends, Query

from .. import batch
from .deps import Farm, NotFound, current_farm, errors, no_nul, resolve_id, role, shown

router = APIRouter(tags=["batches"])


@router.get("/v1/batches", responses=errors())
def list_batches(batch_name: str | None = Query(None, alias="batch", max_length=200),
                 limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=10 ** 9),
                 _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    """Nightly batch runs, newest first, with their counts (built, skipped, failed, regressed) once done."""
    no_nul(batch=batch_name)
    rows, total = farm.store.list_batch_runs(batch_name, limit, offset)
    return {"runs": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/v1/batches/{run_id}", responses=errors(404))
def batch_run(run_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    """A run's night report: per model, new revision or unchanged; per variant, recovery against the
    model's previous release (regressions flagged); failures with their reasons."""
    rep = batch.finalize(farm.store, resolve_id(farm.store, "batch run", run_id), farm.settings.home)
    if rep is None:
        raise NotFound(f"no batch run {shown(run_id)}")
    return rep
