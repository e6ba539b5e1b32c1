"""A worker process: claim a job, run the pipeline on it, report progress, keep the lease alive.

A heartbeat thread renews the lease every third of its length and reads the job's cancel flag; the
pipeline asks `should_stop` at every layer boundary, so cancelling (or losing the lease to another
worker after a stall) stops the run there. Per-layer resume state lives under HOME/state/JOB, so a
job requeued after its worker died resumes from the last completed layer on whichever worker
claims it next.

A worker started by `serve` dies with it: the kernel sends it SIGTERM when serve goes (Linux
PR_SET_PDEATHSIG), and the poll loop and heartbeat also watch the parent pid, so even a serve killed
with SIGKILL leaves no worker holding a lease past one lease period. SIGTERM/SIGINT stop a running job
at its next layer boundary and hand it back to the queue.
"""
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from quantizers.walk import Cancelled
from service.job import pipeline, publish
from service.job.blobstore import BlobStore, is_url
from service.job.blobstore import at as blob_at
from service.job.context import JobContext
from service.job.shared import Shared
from service.job.spec import JobSpec

from core.errors import QuantfarmError
from .policy import Policy, check_paths, check_trust
from .store import Store, migrate

log = logging.getLogger("quantfarm.worker")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent goes; exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError) as e:         # no prctl: the parent-pid checks still hold
            log.warning("cannot ask to die with the parent (%s); watching its pid instead", e)
    if os.getppid() != parent_pid:
        log.warning("parent %d is gone before the worker started; exiting", parent_pid)
        os._exit(1)


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker runs every job with: HOME (artifacts, per-layer state, scratch, baselines), its device, the
    server's policy, the `serve` process it dies with (None: none), its lease and how often it polls the queue."""
    home: Path
    device: str = "cpu"
    policy: Policy = Policy()
    parent_pid: int | None = None
    lease_seconds: float = 30.0
    poll_seconds: float = 0.5


def orphaned(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


class Heartbeat(threading.Thread):
    """Renews the lease every third of it. Orphaned (serve gone), it stops renewing, so the lease runs out,
    and exits the process if the job has not stopped two beats later: within one lease period."""

    def __init__(self, store: Store, job_id: str, worker: str, parent_pid: int | None = None,
                 device: str = "cpu"):
        super().__init__(daemon=True)
        self.store, self.job_id, self.worker, self.parent_pid = store, job_id, worker, parent_pid
        self.device = device
        self.lost = self.cancel = self.orphan = False
        self._stop_event = threading.Event()

    def run(self):
        beats_orphaned = 0
        while not self._stop_event.wait(self.store.lease_seconds / 3):
            if orphaned(self.parent_pid):
                self.orphan = True
                beats_orphaned += 1
                if beats_orphaned >= 2:
                    log.warning("serve is gone and job %s did not stop; exiting", self.job_id)
                    os._exit(1)
                continue
            try:
                ours, self.cancel = self.store.heartbeat(self.job_id, self.worker)
                self.lost = self.lost or not ours
                self.store.worker_seen(self.worker, self.device, device_memory_gb(self.device))
            except Exception as e:          # a database hiccup: the lease covers a few missed beats
                log.warning("heartbeat for %s failed: %s", self.job_id, e)

    def stop(self):
        self._stop_event.set()


def device_memory_gb(device: str) -> float:
    """What a job may use on this worker's device: the GPU's memory, or on CPU the host's."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 30
    return host_memory_gb()


def host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def run_job(store: Store, job: dict, worker: str, home: Path, device: str, policy: Policy = Policy()) -> str:
    """Run one claimed job to its end with nothing shared and nothing asking it to stop (JobRunner.run)."""
    return JobRunner(store, worker, WorkerSetup(home, device, policy)).run(job)


def scratch(home: Path, worker: str, job_id: str) -> Path:
    """This worker's local folder for a job whose state and artifact live in a storage URL: another worker
    resuming the job starts from an empty one and takes the state from the storage."""
    return home / "scratch" / re.sub(r"[^A-Za-z0-9._-]", "_", worker) / job_id


class JobRunner:
    """Runs the jobs claimed under one worker name (the lease holder) with one setup. `stopping` (SIGTERM/SIGINT)
    stops a running job at its next layer boundary and hands it back to the queue."""

    def __init__(self, store: Store, worker: str, setup: WorkerSetup, stopping: threading.Event | None = None):
        self.store, self.worker, self.setup = store, worker, setup
        self.stopping = stopping or threading.Event()

    def run(self, job: dict, shared: Shared | None = None) -> str:
        """Run one claimed job to its end; returns the final state ("lost" if another worker owns it,
        "released" if this worker was asked to stop and handed it back to the queue). `shared`: the work
        this worker already did for the same source (a release's earlier variants)."""
        store, worker, policy = self.store, self.worker, self.setup.policy
        job_id = job["id"]
        try:
            spec = JobSpec.model_validate(job["spec"])
            check_trust(spec, policy, admin=True)       # the API let only admins ask; this worker must allow it too
            check_paths(spec, policy)
            pending = (job.get("result") or {}).get("publish_pending")
            targets = [(e, policy.publish_target(e, admin=True))      # the API checked who may name a URL
                       for e in (spec.publish if pending is None else pending)]
        except (QuantfarmError, ValueError) as e:
            store.finish(job_id, worker, "failed", error=f"this worker refuses the job: {e}")
            return "failed"
        beat = Heartbeat(store, job_id, worker, self.setup.parent_pid, self.setup.device)
        beat.start()
        try:
            if pending:                                 # a retry after a failed publish: the artifact is made
                return self._publish_again(job, spec, targets, beat)
            return self._quantize(job, spec, targets, beat, shared)
        finally:
            beat.stop()

    def _publish_again(self, job: dict, spec: JobSpec, targets: list, beat: Heartbeat) -> str:
        store, worker, job_id, replace = self.store, self.worker, job["id"], self.setup.policy.publish_replace
        result = dict(job["result"])
        if is_url(result["artifact"]):              # in the storage: published from a local copy
            folder = scratch(self.setup.home, worker, job_id) / "artifact"
            shutil.rmtree(folder, ignore_errors=True)
            store_, key = blob_at(result["artifact"])
            store_.get(key, folder)
            state, error, summary = publish_to(store, job_id, spec, targets, {**result, "artifact": str(folder)},
                                               replace)
            summary["artifact"] = result["artifact"]
            shutil.rmtree(folder.parent, ignore_errors=True)
        else:
            state, error, summary = publish_to(store, job_id, spec, targets, result, replace)
        if beat.lost:
            return "lost"
        if store.finish(job_id, worker, state, error=error, result=summary) and state == "succeeded":
            store.mark_published(job_id)
        return state

    def _quantize(self, job: dict, spec: JobSpec, targets: list, beat: Heartbeat, shared: Shared | None) -> str:
        store, worker, home, policy, stopping = self.store, self.worker, self.setup.home, self.setup.policy, self.stopping
        job_id = job["id"]
        blobs = BlobStore(policy.storage) if policy.storage else None
        local = scratch(home, worker, job_id) if blobs else home
        out, state_dir = local / "artifacts" / job_id, local / "state" / job_id
        if blobs is not None:
            shutil.rmtree(local, ignore_errors=True)
            pulled = blobs.get(f"state/{job_id}", state_dir)
            if pulled:
                store.add_event(job_id, "log", f"took {len(pulled)} state files from {blobs.where(f'state/{job_id}')}")

        def on_step(step):
            store.progress(job_id, worker, step=step)
            store.add_event(job_id, "step", step)

        def on_layer(rep, total):
            if blobs is not None:                       # mirrored before the layer is reported done: manifest last
                blobs.put(state_dir, f"state/{job_id}", [f"layer_{rep.index:05d}.safetensors", "inputs.safetensors",
                                                         "manifest.json"])
            store.progress(job_id, worker, layers_done=rep.index + 1, layers_total=total)
            store.add_event(job_id, "layer", f"layer {rep.index + 1}/{total} in {rep.seconds:.1f} s",
                            {"done": rep.index + 1, "total": total, "seconds": round(rep.seconds, 3)})

        def should_stop():
            return beat.cancel or beat.lost or beat.orphan or stopping.is_set()

        if job["attempt"] > 1:
            store.add_event(job_id, "log", f"attempt {job['attempt']}: resuming from the per-layer state in {state_dir}")
        try:
            ctx = JobContext(out, device=self.setup.device, state_dir=state_dir, overwrite=True,
                             cache_dir=home / "baselines", model_roots=tuple(policy.model_roots),
                             shared=shared or Shared(), on_step=on_step, on_layer=on_layer, should_stop=should_stop)
            result = pipeline.run(spec, ctx)
        except Cancelled:
            if beat.lost:
                return "lost"
            if not beat.cancel:                 # this worker is stopping: the job goes on elsewhere
                store.release(job_id, worker)
                return "released"
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
        if beat.lost:
            return "lost"
        state, error = "succeeded", pipeline.quality_failure(spec.min_recovery, result.evaluation)
        if error:
            state, error = "failed_quality", f"{error}; the artifact is kept at {result.artifact} for inspection and is not published"
        summary = result.summary()
        if state == "succeeded":                        # the quality gate decides what is published
            state, error, summary = publish_to(store, job_id, spec, targets, summary, policy.publish_replace)
        path = result.artifact
        if blobs is not None:                           # the artifact lives in the storage; the scratch goes
            store.add_event(job_id, "step", "store artifact")
            blobs.put(Path(result.artifact), f"artifacts/{job_id}")
            path = summary["artifact"] = blobs.where(f"artifacts/{job_id}")
            blobs.remove(f"state/{job_id}")
            shutil.rmtree(local, ignore_errors=True)
        store.finish(job_id, worker, state, error=error, result=summary,
                     artifact={"path": path, "format": spec.format, "size_bytes": result.size_after_bytes,
                               "published": state == "succeeded"})
        shutil.rmtree(state_dir, ignore_errors=True)
        return state


def publish_to(store: Store, job_id: str, spec: JobSpec, targets: list, summary: dict,
               replace: bool = False) -> tuple[str, str | None, dict]:
    """Publish a finished artifact to each (entry, Target); returns (state, error, summary). A failure ends the
    job publish_failed with the entries still to do in its result, so a retry publishes those and quantizes
    nothing again. `replace`: the server's --publish-replace (a folder holding another artifact is overwritten)."""
    try:
        records, pending, why = publish.publish_each(summary["artifact"], spec, targets, replace=replace,
                                                     on_start=lambda e: store.add_event(job_id, "step", f"publish {e}"))
    except Exception as e:              # an upload library's own error: the artifact is intact, a retry may publish
        store.add_event(job_id, "log", traceback.format_exc())
        records, pending = [], [x for x, _ in targets]
        why = f"publishing failed ({type(e).__name__}: {e}); the traceback is in GET /v1/jobs/{job_id}/logs"
    for rec in records:
        note = {"unchanged": " (the same files were there)", "replaced": " (replaced what was there)"}.get(rec.get("status"), "")
        store.add_event(job_id, "log", f"published to {rec['entry']}: {rec['url']}{note}", rec)
    summary = {**summary, "published": [*(summary.get("published") or []), *records], "publish_pending": pending}
    if why:
        return "publish_failed", f"{why}; POST /v1/jobs/{job_id}/retry publishes again without quantizing", summary
    return "succeeded", None, summary


def work(db_url: str, home: Path, device: str = "cpu", lease_seconds: float = 30.0, policy: Policy = Policy(),
         parent_pid: int | None = None):
    """Claim and run jobs until SIGTERM/SIGINT or the parent `serve` (parent_pid) is gone."""
    setup = WorkerSetup(home, device, policy, parent_pid, lease_seconds)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if parent_pid is not None:
        die_with_parent(parent_pid)
    store = Store(db_url, lease_seconds)
    migrate(store.engine)
    worker = f"{socket.gethostname()}:{os.getpid()}:{device}"
    runner = JobRunner(store, worker, setup, stopping)
    memory = device_memory_gb(device)
    log.info("worker %s (%.0f GB) polling %s", worker, memory, db_url.split("@")[-1])
    seen = 0.0
    shared, shared_for = Shared(), None
    try:
        while not stopping.is_set():
            if orphaned(parent_pid):
                log.warning("serve (pid %d) is gone; worker %s exits", parent_pid, worker)
                break
            if time.time() - seen > lease_seconds / 3:       # the API refuses jobs no live worker can hold
                store.worker_seen(worker, device, memory)
                seen = time.time()
            job = store.claim(worker, memory)
            if job is None:
                stopping.wait(setup.poll_seconds)
                continue
            source = (job["model"], job["revision"])
            if source != shared_for:             # keep what was shared for one source only: memory stays bounded
                shared, shared_for = Shared(), source
            log.info("job %s: %s", job["id"], runner.run(job, shared))
    finally:
        try:
            store.worker_gone(worker)
        except Exception as e:
            log.warning("could not sign off %s: %s", worker, e)
