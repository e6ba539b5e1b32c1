"""`serve --executor ray`: jobs run as Ray tasks on a Ray cluster instead of local worker processes.

The store stays the record of jobs, leases, events and artifacts; Ray places and runs. A dispatcher thread
in `serve` claims the highest-priority queued job when the cluster has room for one more (the store's own
claim order: priorities hold), and submits one task for it asking `num_gpus=1` (or `--ray-cpus-per-job`
CPUs) and the job's memory estimate, so Ray puts it on a node with room. The task runs the same `JobRunner`
as a local worker: its heartbeat renews the lease and reads the cancel flag, so cancel stops it at the next
layer boundary. The dispatcher renews the lease too while Ray has the task (placed or still pending); when
Ray reports the task failed (its node died, its worker process was killed) the job goes back to the queue
as its next attempt and resumes on another node from its per-layer state. Ray retries nothing itself
(`max_retries=0`): attempts are counted in one place, the store.

Per-layer state and artifacts live in `--storage URL` (s3://, or file:// on a share every node mounts): a
task computes in its node's scratch folder and mirrors there, so a job resumed on another node continues
from its last finished layer. Without it they are under HOME, which every node must then see at one path.

Ray runs whatever code a connected driver sends, on nodes whose environment holds the store's, S3's and the
Hub's credentials, so quantfarm talks only to a Ray with token authentication (RAY_AUTH_MODE=token). The Ray
it starts itself (`--ray-address auto`) gets a fresh random token in a 0600 file and listens on loopback
only; for a cluster the operator gives its token in RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH.
"""
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from .policy import Policy
from .store import Store
from .worker import JobRunner, WorkerSetup

log = logging.getLogger("quantfarm.ray")
LOOPBACK = ("127.0.0.1", "::1")


def private_ray_token() -> Path:
    """Token auth for the Ray this serve starts: a fresh token in a 0600 file inside a 0700 folder of its
    own, which Ray's processes inherit through RAY_AUTH_TOKEN_PATH (left to itself, Ray 2.60 writes one token
    for all of this user's Rays to ~/.ray/auth_token, readable by every user). Also puts Ray in its
    single-machine mode (read when `ray` is imported), where 127.0.0.1 stays its node address, so its gRPC
    servers (GCS, raylet, workers, agents) bind to loopback instead of every interface. The folder also
    takes Ray's session (logs, sockets, spilled objects), which would otherwise go to the shared /tmp/ray."""
    folder = Path(tempfile.mkdtemp(prefix="quantfarm-ray-"))
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)             # it would take precedence over the file
    os.environ.pop("RAY_ADDRESS", None)                # ray.init() would join that cluster instead
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path),
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    return path


def cluster_token(address: str) -> None:
    """Token auth for a cluster the operator runs: its token from RAY_AUTH_TOKEN, or from the file that
    RAY_AUTH_TOKEN_PATH names (not readable by other users). No token, no connection."""
    from core.errors import QuantfarmError
    where = f"--executor ray: the Ray cluster at {address}"
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise QuantfarmError(f"{where}: RAY_AUTH_MODE={mode}; quantfarm connects only to a Ray with token "
                             "authentication: start the cluster with RAY_AUTH_MODE=token and unset it here")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not os.environ.get("RAY_AUTH_TOKEN") and path:
        try:
            st = os.stat(path)
        except OSError as e:
            raise QuantfarmError(f"{where}: cannot read RAY_AUTH_TOKEN_PATH={path} ({e.strerror})") from None
        if st.st_mode & 0o007:
            raise QuantfarmError(f"{where}: the token file {path} is open to every user: chmod 600 {path}")
    elif not os.environ.get("RAY_AUTH_TOKEN"):
        raise QuantfarmError(f"{where}: no Ray token; give serve the cluster's token in RAY_AUTH_TOKEN or in a "
                             "file (mode 0600) named by RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head "
                             "prints it; the cluster runs with RAY_AUTH_MODE=token)")
    os.environ["RAY_AUTH_MODE"] = "token"           # Ray never turns it on by itself for an explicit address


def run_claimed(db_url: str, job_id: str, worker: str, setup: WorkerSetup) -> str:
    """The Ray task: run the job the dispatcher claimed for `worker` (on whichever node Ray chose)."""
    import ray
    store = Store(db_url, setup.lease_seconds)
    job = store.get(job_id)
    if job is None or job["state"] != "running" or job["worker"] != worker:
        return "lost"                                  # requeued or cancelled while Ray was placing the task
    node = ray.get_runtime_context().get_node_id()
    store.add_event(job_id, "log", f"ray: running on node {node}", {"node": node})
    return JobRunner(store, worker, setup).run(job)


class RayExecutor(threading.Thread):
    """Dispatches the store's queued jobs to Ray tasks; `start()`/`stop()` as the local Supervisor."""

    def __init__(self, db_url: str, home: Path, lease: float, policy: Policy, address: str = "auto",
                 cpus_per_job: float = 1.0):
        """The tasks run with WorkerSetup(home, policy, lease) on the device `kind()` picks; the dispatcher polls
        the queue at the setup's poll interval."""
        super().__init__(daemon=True, name="ray-dispatcher")
        self.db_url, self.setup = db_url, WorkerSetup(Path(home), policy=policy, lease_seconds=lease)
        self.address, self.cpus_per_job = address, cpus_per_job
        self.stopping = threading.Event()
        self.running: dict = {}                         # ObjectRef -> (job id, worker name)
        self.token: Path | None = None                  # a Ray of our own: its token file, beside its session

    def start(self):
        """Connect first, in the caller's thread: a Ray that cannot be reached stops `serve` with the reason."""
        from core.errors import QuantfarmError
        if self.address == "auto":
            self.token = private_ray_token()           # before `import ray`: it reads the single-machine mode
        else:
            cluster_token(self.address)
        import ray
        try:
            if self.address == "auto":                 # a Ray of our own on this machine
                ctx = ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                               _node_ip_address="127.0.0.1", _temp_dir=str(self.token.parent / "ray"))
            else:
                ray.init(address=self.address, log_to_driver=False, ignore_reinit_error=True)
        except Exception as e:
            if self.token is not None:
                shutil.rmtree(self.token.parent, ignore_errors=True)
            raise QuantfarmError(f"--executor ray: cannot connect to Ray at {self.address}: "
                                 f"{type(e).__name__}: {e}") from None
        if self.address == "auto" and ctx.address_info["node_ip_address"] not in LOOPBACK:
            ray.shutdown()                              # `ray` was imported before the mode was set
            shutil.rmtree(self.token.parent, ignore_errors=True)
            raise QuantfarmError(f"--executor ray: the local Ray took node address "
                                 f"{ctx.address_info['node_ip_address']}, not loopback; start serve with "
                                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment")
        super().start()

    def kind(self) -> tuple[dict, str]:
        """(resources one job asks for, the device its task uses): a GPU when the cluster has any."""
        import ray
        if ray.cluster_resources().get("GPU", 0) >= 1:
            return {"num_gpus": 1, "num_cpus": 1}, "cuda"
        return {"num_cpus": self.cpus_per_job}, "cpu"

    def has_room(self, ask: dict) -> bool:
        """Room for one more job now: Ray's free resources, and this dispatcher's own tasks fewer than the
        cluster holds (free resources lag a task just submitted, and a job claimed but left pending in Ray
        would hold its place in the queue against higher priorities arriving later)."""
        import ray
        kind, need = ("GPU", ask["num_gpus"]) if "num_gpus" in ask else ("CPU", ask["num_cpus"])
        slots = int(ray.cluster_resources().get(kind, 0) // need)
        return len(self.running) < slots and ray.available_resources().get(kind, 0) >= need - 1e-9

    def run(self):
        import ray
        store = Store(self.db_url, self.setup.lease_seconds)
        task = ray.remote(max_retries=0)(run_claimed)
        n, beat = 0, 0.0
        while not self.stopping.is_set():
            try:
                self._collect(store)
                if time.time() - beat > self.setup.lease_seconds / 3:
                    for job_id, worker in list(self.running.values()):
                        store.heartbeat(job_id, worker)
                    beat = time.time()
                ask, device = self.kind()
                if self.has_room(ask):
                    worker = f"ray:{os.getpid()}-{n}:{device}"
                    job = store.claim(worker)
                    if job is not None:
                        n += 1
                        memory = int(job["memory_gb"] * 2 ** 30) if job.get("memory_gb") else None
                        ref = task.options(**ask, **({"memory": memory} if memory else {})).remote(
                            self.db_url, job["id"], worker, replace(self.setup, device=device))
                        self.running[ref] = (job["id"], worker)
                        store.add_event(job["id"], "log", f"ray: submitted as {worker} asking {ask}"
                                        + (f" and {job['memory_gb']:.1f} GB" if memory else ""))
                        continue                        # maybe room for another at once
            except Exception as e:                      # a database or Ray hiccup: try again next poll
                log.warning("ray dispatcher: %s", e)
            self.stopping.wait(self.setup.poll_seconds)

    def _collect(self, store: Store):
        """Finished tasks out of the table; a failed task's job back to the queue as its next attempt."""
        import ray
        if not self.running:
            return
        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        for ref in done:
            job_id, worker = self.running.pop(ref)
            try:
                log.info("job %s: %s", job_id, ray.get(ref))
            except Exception as e:                      # node died, worker killed, out of memory
                reason = f"ray task of {worker} failed: {type(e).__name__}"
                log.warning("job %s: %s (%s)", job_id, reason, str(e).splitlines()[0] if str(e) else "")
                store.lost(job_id, worker, reason)

    def stop(self, grace: float = 20.0):
        """Stop dispatching; jobs already on Ray hand themselves back when their lease runs out unless they
        finish first (the cluster outlives this serve). A Ray of our own goes now, with its folder."""
        self.stopping.set()
        self.join(timeout=grace)
        if self.token is not None:
            import ray
            ray.shutdown()
            shutil.rmtree(self.token.parent, ignore_errors=True)
