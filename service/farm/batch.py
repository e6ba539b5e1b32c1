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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import QuantfarmError, SpecError
from evaluation.suite import Evaluation
from service.job import merge_recipe
from service.job.release import PRESETS, ReleaseSpec, Variant
from service.job.spec import Calibration

from . import releases
from .store import Store, Submitter

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
        if isinstance(m, dict) and isinstance(m.get("model"), str) and merge_recipe.is_recipe_path(m["model"]) \
                and "merge" not in m:
            recipe = p.parent / m["model"]
            m["model"], m["merge"] = recipe.stem, merge_recipe.load_recipe(recipe)
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
    if not store.open_batch_run(run_id, spec.name, slot or run_id, {"spec": spec.model_dump(mode="json")}):
        return None
    problems = []
    checks, submitter = releases.ReleaseChecks(pin, admit), Submitter(f"batch:{spec.name}", batch_run=run_id)
    for i, m in enumerate(spec.models):
        try:
            releases.submit(store, spec.release(i), checks, submitter)
        except QuantfarmError as e:                       # this model fails; the others go on
            problems.append({"model": m.model, "error": str(e)})
            log.warning("batch %s: %s refused: %s", spec.name, m.model, e)
    store.set_batch_report(run_id, {"spec": spec.model_dump(mode="json"), "refused": problems})
    return run_id


def report(store: Store, run_id: str) -> dict | None:
    """The night report, live while the run's jobs go on; stored (with HOME/batches files) once they end."""
    found = store.batch_run_with_releases(run_id)
    if found is None:
        return None
    run, rels = found
    if run["state"] != "running":
        return run["report"]
    spec = BatchSpec.model_validate(run["report"]["spec"])
    models = [_model_entry(store, r, spec.gate.max_regression) for r in rels]
    models += [{"model": p["model"], "state": "failed", "error": p["error"], "variants": []}
               for p in run["report"].get("refused", [])]
    done = all(m["state"] != "running" for m in models)
    variants = [v for m in models for v in m["variants"]]
    counts = {"models": len(models), "built": sum(v["built"] for v in variants),
              "skipped": sum(not v["built"] for v in variants),
              "failed": sum(v["state"] not in ("succeeded", "queued", "running") for v in variants)
              + len(run["report"].get("refused", [])),
              "regressed": sum(bool(v.get("regressed")) for v in variants)}
    out = {"run": run["id"], "batch": run["batch"], "slot": run["slot"], "started_at": run["started_at"],
           "state": "done" if done else "running", "counts": counts, "models": models,
           "spec": run["report"]["spec"], "refused": run["report"].get("refused", [])}
    return out


def _model_entry(store: Store, rel: dict, max_regression: float) -> dict:
    view = releases.get(store, rel["id"])
    prev = store.previous_release(rel["model"], before=rel["created_at"])
    before = {v["variant"]: v for v in releases.get(store, prev["id"])["variants"]} if prev else {}
    change = "first" if prev is None else "unchanged" if prev["revision"] == rel["revision"] else "new revision"
    variants = []
    for v in view["variants"]:
        old = before.get(v["variant"], {})
        delta = None if v.get("recovery") is None or old.get("recovery") is None else v["recovery"] - old["recovery"]
        variants.append({"variant": v["variant"], "job_id": v["job_id"], "state": v["state"],
                         "built": not v["reused_job"], "recovery": v.get("recovery"),
                         "previous_recovery": old.get("recovery"), "delta": delta,
                         "regressed": delta is not None and delta < -max_regression, "error": v.get("error")})
    return {"model": rel["model"], "revision": rel["revision"], "previous_revision": prev["revision"] if prev else None,
            "change": change, "release": rel["id"], "state": view["state"], "variants": variants}


def finalize(store: Store, run_id: str, home: Path | None = None) -> dict | None:
    """Store the report of a run whose jobs all ended (and write HOME/batches/RUN/night-report.{json,md})."""
    rep = report(store, run_id)
    if rep is None or rep["state"] != "done" or "finished_at" in rep:
        return rep
    rep = {**rep, "finished_at": time.time()}
    if not store.close_batch_run(run_id, rep):              # another process closed it first
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


def status_line(rep: dict, since_beat: float | None, live: bool, quiet: float) -> str:
    """One line of what a waiting `batch run --wait` waits for: its jobs by state, and the workers."""
    states = [v["state"] for m in rep["models"] for v in m["variants"]]
    queued, running = states.count("queued"), states.count("running")
    refused = f" ({len(rep['refused'])} model(s) refused)" if rep["refused"] else ""
    workers_part = f"a worker beat {since_beat:.0f} s ago" if live else f"no live worker seen for {quiet:.0f} s"
    return (f"batch {rep['batch']} run {rep['run'][:12]}: {queued} job(s) queued, {running} running, "
            f"{len(states) - queued - running} done{refused}; {workers_part}")


@dataclass(frozen=True)
class Pace:
    """How `wait` waits: it reads the run every `poll` s, gives up after `timeout` s (None: never) and tells
    its status every `status_every` s."""
    poll: float = 2.0
    timeout: float | None = None
    status_every: float = 30.0


def wait(store: Store, run_id: str, home: Path | None = None, *, no_worker_timeout: float | None = None,
         on_status=None, pace: Pace = Pace()) -> dict:
    """The run's report once its jobs have ended (or the pace's timeout passed). `on_status(line)` hears what it
    waits for, at once and every `pace.status_every` s. Raises NothingRuns when every model was refused, or when
    no worker has beaten for `no_worker_timeout` s (counted from the later of the wait's start and the last beat):
    the jobs would sit queued for ever."""
    start = time.time()
    deadline = None if pace.timeout is None else start + pace.timeout
    said = None
    while True:
        rep = finalize(store, run_id, home)
        if all_refused(rep):
            raise NothingRuns(f"every model of batch {rep['batch']} was refused ({len(rep['refused'])}); nothing "
                              "was queued: the reasons are in the report", rep)
        if rep["state"] != "running" or (deadline and time.time() > deadline):
            return rep
        now, beat = time.time(), store.last_worker_beat()
        quiet = now - max(start, beat or 0.0)
        live = beat is not None and now - beat <= 3 * store.lease_seconds       # as the API counts workers alive
        if no_worker_timeout and quiet > no_worker_timeout:
            raise NothingRuns(f"batch {rep['batch']} run {rep['run'][:12]}: no worker has been alive for "
                              f"{quiet:.0f} s (--no-worker-timeout {no_worker_timeout:g}), so its jobs stay queued; "
                              "start `quantfarm serve` (with workers) or `quantfarm worker` on this store, then "
                              "follow the run with GET /v1/batches/RUN", rep)
        if on_status is not None and (said is None or now - said >= pace.status_every):
            on_status(status_line(rep, None if beat is None else now - beat, live, quiet))
            said = now
        time.sleep(pace.poll)


def totals(store: Store) -> dict:
    """Sums over finished runs, for the Prometheus counters."""
    out = {"runs": 0, "built": 0, "skipped": 0, "failed": 0, "regressed": 0}
    for counts in store.finished_batch_counts():
        out["runs"] += 1
        for k in ("built", "skipped", "failed", "regressed"):
            out[k] += counts.get(k, 0)
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

    POLL_SECONDS = 5.0          # how often running runs are finalized and the next firing looked for

    def __init__(self, store: Store, path, cron: str, *, pin, admit, home: Path | None = None):
        super().__init__(daemon=True, name="batch-scheduler")
        from croniter import croniter
        if not croniter.is_valid(cron):
            raise SpecError(f"--cron {cron!r} is not a valid cron expression (five fields, e.g. '0 2 * * *')")
        self.store, self.path, self.cron, self.home = store, Path(path), cron, home
        self.pin, self.admit = pin, admit
        self.spec = load(self.path)                 # a bad file fails serve at start, not at 2 a.m.
        self.stopping = threading.Event()

    def slots(self, now: float) -> tuple[float, float]:
        from croniter import croniter
        it = croniter(self.cron, now)
        return it.get_prev(float), croniter(self.cron, now).get_next(float)

    def fire(self, when: float) -> str | None:
        slot = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        busy = next(iter(self.store.running_batch_run_ids(self.spec.name)), None)
        if busy is not None and finalize(self.store, busy, self.home)["state"] == "running":
            self.store.record_overlap(self.spec.name, slot, f"run {busy} was still going")
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
        while not self.stopping.wait(min(self.POLL_SECONDS, max(0.0, nxt - time.time()))):
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
        return self.store.has_batch_slot(self.spec.name, slot)

    def _finalize_running(self):
        try:
            for i in self.store.running_batch_run_ids():
                finalize(self.store, i, self.home)
        except Exception as e:
            log.warning("finalizing batch runs failed: %s", e)

    def stop(self):
        self.stopping.set()

