"""Nightly re-quantization: a batch file lists models to track; each run pins every model's current
revision and submits its release, where a variant whose recipe (settings + revision) was built before
links that job instead of building again, so an unchanged model costs nothing. The run's night report
says per model whether its revision moved, per variant its recovery against the model's previous
release (regressions past the gate's threshold flagged), and every failure with its reason.

One run per schedule firing, whatever the number of API processes: a run is a row whose (batch, slot)
is unique, so of several schedulers firing at once exactly one inserts it and the others skip.
"""
import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from core.errors import QuantfarmError, SpecError
from evaluation.suite import Evaluation
from service.job import merge
from service.job.release import PRESETS, ReleaseSpec, Variant
from service.job.spec import Calibration

from . import releases
from .store import Store, batch_runs, workers
from .store import releases as releases_table

log = logging.getLogger("quantfarm.batch")


class NothingRuns(QuantfarmError):
    """A batch run that cannot finish: every model was refused, or no worker has been alive to build its jobs
    for longer than the caller waits. `report` is the run's report at that moment."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_recovery: float | None = Field(None, gt=0, le=2, description="a variant below this is not published")
    max_regression: float = Field(0.01, ge=0, le=1, description="recovery drop against the previous release flagged")


class TrackedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300, description="the source; with `merge`: the merged model's "
                       "name; a .yaml path (relative to the batch file): a mergekit recipe file")
    track: str | None = Field(None, max_length=256, description="Hub branch or tag to follow (default: main)")
    merge: dict | None = Field(None, description="a mergekit recipe, re-merged when one of its sources changes")
    preset: str | None = None
    variants: list[Variant] = Field([], max_length=32)


class BatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    models: list[TrackedModel] = Field(..., min_length=1, max_length=200)
    preset: str | None = Field(None, description=" | ".join(PRESETS))
    variants: list[Variant] = Field([], max_length=32)
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    publish: list[str] = Field(["local"], max_length=4)
    gate: Gate = Gate()
    priority: int = Field(-10, ge=-100, le=100, description="nightly work yields to interactive jobs by default")

    @model_validator(mode="after")
    def _releases_valid(self):
        for i, _ in enumerate(self.models):
            try:
                self.release(i)
            except ValidationError as e:
                raise ValueError(f"models[{i}] ({self.models[i].model}): " + "; ".join(
                    x["msg"].replace("Value error, ", "") for x in e.errors())) from None
        return self

    def release(self, i: int) -> ReleaseSpec:
        m = self.models[i]
        own = {"preset": m.preset} if m.preset else {"variants": m.variants} if m.variants else \
            {"preset": self.preset} if self.preset else {"variants": self.variants}
        return ReleaseSpec(model=m.model, revision=m.track, merge=m.merge, **own, calibration=self.calibration,
                           evaluation=self.evaluation, publish=self.publish, min_recovery=self.gate.min_recovery,
                           priority=self.priority)


def load(path) -> BatchSpec:
    import yaml
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise SpecError(f"batch file {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"batch file {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"batch file {p}: expected a mapping with `models:`")
    data.setdefault("name", p.stem)
    for m in data.get("models") or []:              # recipe files named by path travel inline, like the CLI's
        if isinstance(m, dict) and isinstance(m.get("model"), str) and merge.is_recipe_path(m["model"]) \
                and "merge" not in m:
            recipe = p.parent / m["model"]
            m["model"], m["merge"] = recipe.stem, merge.load_recipe(recipe)
    try:
        return BatchSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"batch file {p}: " + "; ".join(
            f"{'.'.join(map(str, x['loc'])) or 'file'}: {x['msg']}" for x in e.errors())) from None


# ---- runs ---------------------------------------------------------------------------------------------

def start(store: Store, spec: BatchSpec, *, pin, admit, slot: str | None = None) -> str | None:
    """Record a run for `slot` (a schedule's fire time; default: a new slot) and submit every model's
    release; returns the run id, or None when another process already holds the slot."""
    run_id = uuid.uuid4().hex
    try:
        with store.engine.begin() as c:
            c.execute(insert(batch_runs).values(id=run_id, batch=spec.name, slot=slot or run_id, state="running",
                                                started_at=time.time(), report={"spec": spec.model_dump(mode="json")}))
    except IntegrityError:
        return None
    problems = []
    for i, m in enumerate(spec.models):
        try:
            releases.submit(store, spec.release(i), pin=pin, admit=admit, submitted_by=f"batch:{spec.name}",
                            batch_run=run_id)
        except QuantfarmError as e:                       # this model fails; the others go on
            problems.append({"model": m.model, "error": str(e)})
            log.warning("batch %s: %s refused: %s", spec.name, m.model, e)
    with store.engine.begin() as c:
        c.execute(update(batch_runs).where(batch_runs.c.id == run_id).values(
            report={"spec": spec.model_dump(mode="json"), "refused": problems}))
    return run_id


def report(store: Store, run_id: str) -> dict | None:
    """The night report, live while the run's jobs go on; stored (with HOME/batches files) once they end."""
    with store.engine.connect() as c:
        run = c.execute(select(batch_runs).where(batch_runs.c.id == run_id)).first()
        if run is None:
            return None
        rels = c.execute(select(releases_table).where(releases_table.c.batch_run == run_id)
                         .order_by(releases_table.c.created_at)).all()
    if run.state != "running":
        return run.report
    spec = BatchSpec.model_validate(run.report["spec"])
    models = [_model_entry(store, r, spec.gate.max_regression) for r in rels]
    models += [{"model": p["model"], "state": "failed", "error": p["error"], "variants": []}
               for p in run.report.get("refused", [])]
    done = all(m["state"] != "running" for m in models)
    variants = [v for m in models for v in m["variants"]]
    counts = {"models": len(models), "built": sum(v["built"] for v in variants),
              "skipped": sum(not v["built"] for v in variants),
              "failed": sum(v["state"] not in ("succeeded", "queued", "running") for v in variants)
              + len(run.report.get("refused", [])),
              "regressed": sum(bool(v.get("regressed")) for v in variants)}
    out = {"run": run.id, "batch": run.batch, "slot": run.slot, "started_at": run.started_at,
           "state": "done" if done else "running", "counts": counts, "models": models,
           "spec": run.report["spec"], "refused": run.report.get("refused", [])}
    return out


def _model_entry(store: Store, rel, max_regression: float) -> dict:
    view = releases.get(store, rel.id)
    with store.engine.connect() as c:
        prev = c.execute(select(releases_table.c.id, releases_table.c.revision)
                         .where(releases_table.c.model == rel.model, releases_table.c.created_at < rel.created_at)
                         .order_by(releases_table.c.created_at.desc()).limit(1)).first()
    before = {v["variant"]: v for v in releases.get(store, prev.id)["variants"]} if prev else {}
    change = "first" if prev is None else "unchanged" if prev.revision == rel.revision else "new revision"
    variants = []
    for v in view["variants"]:
        old = before.get(v["variant"], {})
        delta = None if v.get("recovery") is None or old.get("recovery") is None else v["recovery"] - old["recovery"]
        variants.append({"variant": v["variant"], "job_id": v["job_id"], "state": v["state"],
                         "built": not v["reused_job"], "recovery": v.get("recovery"),
                         "previous_recovery": old.get("recovery"), "delta": delta,
                         "regressed": delta is not None and delta < -max_regression, "error": v.get("error")})
    return {"model": rel.model, "revision": rel.revision, "previous_revision": prev.revision if prev else None,
            "change": change, "release": rel.id, "state": view["state"], "variants": variants}


def finalize(store: Store, run_id: str, home: Path | None = None) -> dict | None:
    """Store the report of a run whose jobs all ended (and write HOME/batches/RUN/night-report.{json,md})."""
    rep = report(store, run_id)
    if rep is None or rep["state"] != "done" or "finished_at" in rep:
        return rep
    rep = {**rep, "finished_at": time.time()}
    with store.engine.begin() as c:
        if not c.execute(update(batch_runs).where(batch_runs.c.id == run_id, batch_runs.c.state == "running")
                         .values(state="done", finished_at=rep["finished_at"], counts=rep["counts"],
                                 report=rep)).rowcount:
            return report(store, run_id)
    if home is not None:
        folder = Path(home) / "batches" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "night-report.json").write_text(json.dumps(rep, indent=2) + "\n")
        (folder / "night-report.md").write_text(markdown(rep))
    return rep


def all_refused(rep: dict) -> bool:
    """Every model of the run was refused at submission: nothing was queued, nothing will run."""
    return bool(rep["refused"]) and len(rep["refused"]) == len(rep["spec"]["models"])


def last_worker_beat(store: Store) -> float | None:
    """When a worker (serve's, or a `quantfarm worker` on the store) last said it was alive; None: never."""
    with store.engine.connect() as c:
        return c.execute(select(func.max(workers.c.seen_at))).scalar()


def status_line(rep: dict, since_beat: float | None, live: bool, quiet: float) -> str:
    """One line of what a waiting `batch run --wait` waits for: its jobs by state, and the workers."""
    states = [v["state"] for m in rep["models"] for v in m["variants"]]
    queued, running = states.count("queued"), states.count("running")
    refused = f" ({len(rep['refused'])} model(s) refused)" if rep["refused"] else ""
    workers_part = f"a worker beat {since_beat:.0f} s ago" if live else f"no live worker seen for {quiet:.0f} s"
    return (f"batch {rep['batch']} run {rep['run'][:12]}: {queued} job(s) queued, {running} running, "
            f"{len(states) - queued - running} done{refused}; {workers_part}")


def wait(store: Store, run_id: str, home: Path | None = None, poll: float = 2.0, timeout: float | None = None,
         no_worker_timeout: float | None = None, on_status=None, status_every: float = 30.0) -> dict:
    """The run's report once its jobs have ended (or `timeout` passed). `on_status(line)` hears what it waits
    for, at once and every `status_every` s. Raises NothingRuns when every model was refused, or when no worker
    has beaten for `no_worker_timeout` s (counted from the later of the wait's start and the last beat): the
    jobs would sit queued for ever."""
    start = time.time()
    deadline = None if timeout is None else start + timeout
    said = None
    while True:
        rep = finalize(store, run_id, home)
        if all_refused(rep):
            raise NothingRuns(f"every model of batch {rep['batch']} was refused ({len(rep['refused'])}); nothing "
                              "was queued: the reasons are in the report", rep)
        if rep["state"] != "running" or (deadline and time.time() > deadline):
            return rep
        now, beat = time.time(), last_worker_beat(store)
        quiet = now - max(start, beat or 0.0)
        live = beat is not None and now - beat <= 3 * store.lease_seconds       # as the API counts workers alive
        if no_worker_timeout and quiet > no_worker_timeout:
            raise NothingRuns(f"batch {rep['batch']} run {rep['run'][:12]}: no worker has been alive for "
                              f"{quiet:.0f} s (--no-worker-timeout {no_worker_timeout:g}), so its jobs stay queued; "
                              "start `quantfarm serve` (with workers) or `quantfarm worker` on this store, then "
                              "follow the run with GET /v1/batches/RUN", rep)
        if on_status is not None and (said is None or now - said >= status_every):
            on_status(status_line(rep, None if beat is None else now - beat, live, quiet))
            said = now
        time.sleep(poll)


def list_runs(store: Store, batch: str | None = None, limit: int = 20, offset: int = 0) -> tuple[list[dict], int]:
    q = select(batch_runs.c.id, batch_runs.c.batch, batch_runs.c.slot, batch_runs.c.state, batch_runs.c.started_at,
               batch_runs.c.finished_at, batch_runs.c.counts)
    n = select(func.count()).select_from(batch_runs)
    if batch is not None:
        q, n = q.where(batch_runs.c.batch == batch), n.where(batch_runs.c.batch == batch)
    with store.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(q.order_by(batch_runs.c.started_at.desc()).limit(limit).offset(offset))]
        return rows, c.execute(n).scalar_one()


def totals(store: Store) -> dict:
    """Sums over finished runs, for the Prometheus counters."""
    out = {"runs": 0, "built": 0, "skipped": 0, "failed": 0, "regressed": 0}
    with store.engine.connect() as c:
        for r in c.execute(select(batch_runs.c.counts).where(batch_runs.c.state == "done")):
            out["runs"] += 1
            for k in ("built", "skipped", "failed", "regressed"):
                out[k] += (r.counts or {}).get(k, 0)
    return out


def markdown(rep: dict) -> str:
    c = rep["counts"]
    lines = [f"# Night report: {rep['batch']}", "",
             f"Run `{rep['run']}` at {datetime.fromtimestamp(rep['started_at'], timezone.utc):%Y-%m-%d %H:%M} UTC: "
             f"{c['models']} models, {c['built']} variants built, {c['skipped']} unchanged (skipped), "
             f"{c['failed']} failed, {c['regressed']} regressed.", ""]
    for m in rep["models"]:
        head = f"## {m['model']}: " + (m.get("change") or "refused")
        if m.get("revision"):
            head += f" (revision `{m['revision'][:12]}`" + (f", was `{m['previous_revision'][:12]}`"
                                                          if m.get("previous_revision") else "") + ")"
        lines += [head, ""]
        if m.get("error"):
            lines += [f"Failed: {m['error']}", ""]
        if m["variants"]:
            lines += ["| variant | state | built | recovery | previous | delta |", "|---|---|---|---|---|---|"]
            for v in m["variants"]:
                pct = (lambda x: "n/a" if x is None else f"{100 * x:.2f}%")
                delta = "n/a" if v["delta"] is None else f"{100 * v['delta']:+.2f} pt" + (" REGRESSED" if v["regressed"] else "")
                lines.append(f"| {v['variant']} | {v['state']} | {'yes' if v['built'] else 'no'} | {pct(v['recovery'])} "
                             f"| {pct(v['previous_recovery'])} | {delta} |")
            lines += [f"- {v['variant']}: {v['error']}" for v in m["variants"] if v.get("error")]
            lines.append("")
    return "\n".join(lines)


# ---- the schedule -----------------------------------------------------------------------------------

class Scheduler(threading.Thread):
    """Fires a batch file on a cron expression (croniter) inside `serve`. Every firing is a slot named by
    its time; whichever serve process inserts the slot's row runs it, the others skip it. Missed firings
    (serve was down) are not replayed one by one: at start-up the latest firing runs once if no process
    ran it, older ones are skipped. A firing while the previous run's jobs still go on is
    recorded as skipped (state `overlap`), so runs never pile up. Firings are read in UTC."""

    def __init__(self, store: Store, path, cron: str, *, pin, admit, home: Path | None = None, poll: float = 5.0):
        super().__init__(daemon=True, name="batch-scheduler")
        from croniter import croniter
        if not croniter.is_valid(cron):
            raise SpecError(f"--cron {cron!r} is not a valid cron expression (five fields, e.g. '0 2 * * *')")
        self.store, self.path, self.cron, self.home, self.poll = store, Path(path), cron, home, poll
        self.pin, self.admit = pin, admit
        self.spec = load(self.path)                 # a bad file fails serve at start, not at 2 a.m.
        self.stopping = threading.Event()

    def slots(self, now: float) -> tuple[float, float]:
        from croniter import croniter
        it = croniter(self.cron, now)
        return it.get_prev(float), croniter(self.cron, now).get_next(float)

    def fire(self, when: float) -> str | None:
        slot = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.store.engine.connect() as c:
            busy = c.execute(select(batch_runs.c.id).where(batch_runs.c.batch == self.spec.name,
                                                           batch_runs.c.state == "running")).first()
        if busy is not None and finalize(self.store, busy.id, self.home)["state"] == "running":
            try:
                with self.store.engine.begin() as c:
                    c.execute(insert(batch_runs).values(id=uuid.uuid4().hex, batch=self.spec.name, slot=slot,
                                                        state="overlap", started_at=time.time(),
                                                        finished_at=time.time(),
                                                        report={"reason": f"run {busy.id} was still going"}))
            except IntegrityError:
                pass
            return None
        try:
            spec = load(self.path)                  # the file as it is now
        except SpecError as e:
            log.error("batch %s: %s; this firing is skipped", self.path, e)
            return None
        run = start(self.store, spec, pin=self.pin, admit=self.admit, slot=slot)
        if run:
            log.info("batch %s: run %s for %s", spec.name, run, slot)
        return run

    def run(self):
        prev, nxt = self.slots(time.time())
        if not self._has_slot(prev):                 # the latest firing, if no process ran it: made up once
            self._guarded(prev)
        while not self.stopping.wait(min(self.poll, max(0.0, nxt - time.time()))):
            self._finalize_running()
            if time.time() >= nxt:
                self._guarded(nxt)
                nxt = self.slots(time.time())[1]

    def _guarded(self, when: float):
        try:
            self.fire(when)
        except Exception as e:                     # a store hiccup must not end the schedule
            log.exception("batch firing at %s failed: %s", when, e)

    def _has_slot(self, when: float) -> bool:
        slot = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.store.engine.connect() as c:
            return c.execute(select(batch_runs.c.id).where(batch_runs.c.batch == self.spec.name,
                                                           batch_runs.c.slot == slot)).first() is not None

    def _finalize_running(self):
        try:
            with self.store.engine.connect() as c:
                ids = [r.id for r in c.execute(select(batch_runs.c.id).where(batch_runs.c.state == "running"))]
            for i in ids:
                finalize(self.store, i, self.home)
        except Exception as e:
            log.warning("finalizing batch runs failed: %s", e)

    def stop(self):
        self.stopping.set()

