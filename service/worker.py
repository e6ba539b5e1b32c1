"""A worker process: claim a job, run the pipeline on it, report progress, keep the lease alive.

A heartbeat thread renews the lease every third of its length and reads the job's cancel flag; the
pipeline asks `should_stop` at every layer boundary, so cancelling (or losing the lease to another
worker after a stall) stops the run there. Per-layer checkpoints live under HOME/state/JOB, so a
job requeued after its worker died resumes from the last completed layer on whichever worker
claims it next.
"""
import logging
import os
import shutil
import signal
import socket
import threading
import traceback
from pathlib import Path

import torch

from quantizers.driver import Cancelled

from . import pipeline
from .errors import QuantfarmError
from .spec import JobSpec
from .store import Store, migrate

log = logging.getLogger("quantfarm.worker")


class Heartbeat(threading.Thread):
    def __init__(self, store: Store, job_id: str, worker: str):
        super().__init__(daemon=True)
        self.store, self.job_id, self.worker = store, job_id, worker
        self.lost = self.cancel = False
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.store.lease_seconds / 3):
            try:
                ours, self.cancel = self.store.heartbeat(self.job_id, self.worker)
                self.lost = self.lost or not ours
            except Exception as e:          # a database hiccup: the lease covers a few missed beats
                log.warning("heartbeat for %s failed: %s", self.job_id, e)

    def stop(self):
        self._stop_event.set()


def device_memory_gb(device: str) -> float | None:
    """What a job may use on this worker's device; None on CPU (host memory is not budgeted)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 30


def run_job(store: Store, job: dict, worker: str, home: Path, device: str) -> str:
    """Run one claimed job to its end; returns the final state (or "lost" if another worker owns it)."""
    job_id = job["id"]
    spec = JobSpec.model_validate(job["spec"])
    out, state_dir = home / "artifacts" / job_id, home / "state" / job_id
    beat = Heartbeat(store, job_id, worker)
    beat.start()

    def on_step(step):
        store.progress(job_id, worker, step=step)
        store.add_event(job_id, "step", step)

    def on_layer(rep, total):
        store.progress(job_id, worker, layers_done=rep.index + 1, layers_total=total)
        store.add_event(job_id, "layer", f"layer {rep.index + 1}/{total} in {rep.seconds:.1f} s",
                        {"done": rep.index + 1, "total": total, "seconds": round(rep.seconds, 3)})

    def should_stop():
        return beat.cancel or beat.lost

    if job["attempt"] > 1:
        store.add_event(job_id, "log", f"attempt {job['attempt']}: resuming from the checkpoints in {state_dir}")
    try:
        result = pipeline.run(spec, out, device=device, state_dir=state_dir, overwrite=True,
                              cache_dir=home / "baselines", on_step=on_step,
                              on_layer=on_layer, should_stop=should_stop)
    except Cancelled:
        if beat.lost:
            return "lost"
        store.finish(job_id, worker, "cancelled")
        return "cancelled"
    except QuantfarmError as e:
        store.finish(job_id, worker, "failed", error=str(e))
        return "failed"
    except Exception as e:
        store.add_event(job_id, "log", traceback.format_exc())
        store.finish(job_id, worker, "failed", error=f"internal error ({type(e).__name__}: {e}); the traceback is "
                                                     f"in GET /v1/jobs/{job_id}/logs; retry with POST .../retry")
        return "failed"
    finally:
        beat.stop()
    if beat.lost:
        return "lost"
    state, error, recovery = "succeeded", pipeline.quality_failure(spec.min_recovery, result.evaluation), result.recovery
    if error:
        state, error = "failed_quality", f"{error}; the artifact is kept at {result.artifact} for inspection and is not published"
    summary = {"artifact": result.artifact, "revision": result.revision, "recipe_key": result.recipe_key,
               "calibration_hash": result.calibration_hash, "seconds": result.seconds,
               "size_before_bytes": result.size_before_bytes, "size_after_bytes": result.size_after_bytes,
               "perplexity": result.perplexity, "recovery": recovery,
               "recovery_basis": result.evaluation.get("recovery_basis"), "warnings": result.warnings}
    store.finish(job_id, worker, state, error=error, result=summary,
                 artifact={"path": result.artifact, "format": spec.format, "size_bytes": result.size_after_bytes,
                           "published": state == "succeeded"})
    shutil.rmtree(state_dir, ignore_errors=True)
    return state


def work(db_url: str, home: Path, device: str = "cpu", lease_seconds: float = 30.0, poll_seconds: float = 0.5,
         max_jobs: int | None = None):
    """Claim and run jobs until SIGTERM/SIGINT (or `max_jobs` jobs)."""
    store = Store(db_url, lease_seconds)
    migrate(store.engine)
    worker = f"{socket.gethostname()}:{os.getpid()}:{device}"
    memory = device_memory_gb(device)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    log.info("worker %s polling %s", worker, db_url.split("@")[-1])
    done = 0
    while not stopping.is_set() and (max_jobs is None or done < max_jobs):
        job = store.claim(worker, memory)
        if job is None:
            stopping.wait(poll_seconds)
            continue
        log.info("job %s: %s", job["id"], run_job(store, job, worker, home, device))
        done += 1
