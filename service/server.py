"""`quantfarm serve` (the API plus local workers) and `quantfarm worker` (workers for a shared store).

serve runs uvicorn in this process and one worker process per visible GPU (CUDA_VISIBLE_DEVICES
set per worker), or --cpu-slots CPU workers when there is none; a supervisor thread restarts a
worker that dies (its job goes back to the queue when the lease expires and resumes from its
checkpoint). Everything lives under HOME (QUANTFARM_HOME, default ~/.quantfarm): the SQLite store,
tokens.json, artifacts/ and per-job state/.

Shutdown: SIGTERM and SIGINT stop the workers (each hands its job back at the next layer boundary)
before serve exits; workers also die with serve if it is killed outright (see worker.py), so a
restarted serve never runs beside orphans of the last one.
"""
import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import policy
from .cli import HelpWithDefaults


def default_home() -> Path:
    return Path(os.environ.get("QUANTFARM_HOME", "~/.quantfarm")).expanduser()


def default_db(home: Path) -> str:
    return os.environ.get("QUANTFARM_DB") or f"sqlite:///{home / 'quantfarm.db'}"


def _common(p):
    p.add_argument("--home", type=Path, default=None, help="data folder (QUANTFARM_HOME, default ~/.quantfarm)")
    p.add_argument("--db", help="database URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
                                "(QUANTFARM_DB; default sqlite under HOME)")
    p.add_argument("--lease", type=float, default=30.0, help="seconds a worker's lease lasts without a heartbeat")
    policy.add_arguments(p)


def add_parsers(sub):
    fmt = HelpWithDefaults
    p = sub.add_parser("serve", help="run the HTTP API and local worker processes", formatter_class=fmt)
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8600, help="TCP port of the API")
    p.add_argument("--tokens", type=Path, help="tokens file (default HOME/tokens.json, created with an admin token)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per visible GPU, else --cpu-slots; 0: API only)")
    p.add_argument("--cpu-slots", type=int, default=1, help="CPU workers when no GPU is visible")
    p.add_argument("--max-attempts", type=int, default=3, help="runs a job gets before a lost worker fails it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run workers against a (shared) job store", formatter_class=fmt)
    _common(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)     # set by serve: exit when it is gone
    p.set_defaults(func=cmd_worker)


def cmd_worker(a) -> int:
    from .pipeline import pick_device
    from .worker import work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = a.home or default_home()
    device = str(pick_device(a.device))
    work(a.db or default_db(home), home, device=device, lease_seconds=a.lease, policy=policy.from_args(a),
         parent_pid=a.parent_pid)
    return 0


class Supervisor(threading.Thread):
    """Keeps `n` worker processes alive; restarts one that exits (at most once per 5 s). Starting and
    stopping take one lock, so no worker is started after stop() has begun."""

    def __init__(self, commands: list[tuple[list[str], dict]]):
        super().__init__(daemon=True)
        self.commands = commands
        self.procs: list[subprocess.Popen | None] = [None] * len(commands)
        self.stopping, self.stopped = threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def run(self):
        last = [0.0] * len(self.commands)
        while not self.stopping.is_set():
            with self.lock:
                for i, (cmd, env) in enumerate(self.commands):
                    p = self.procs[i]
                    if self.stopping.is_set() or (p is not None and p.poll() is None) or time.time() - last[i] <= 5:
                        continue
                    if p is not None:
                        logging.getLogger("quantfarm.serve").warning("worker %d exited (%s); restarting", i,
                                                                     p.returncode)
                    self.procs[i] = subprocess.Popen(cmd, env=env)
                    last[i] = time.time()
            self.stopping.wait(0.5)
        # PR_SET_PDEATHSIG follows the thread that started a child: stay alive until the workers are gone
        self.stopped.wait()

    def stop(self, grace: float = 20.0):
        """SIGTERM every worker (each hands its job back at the next layer boundary), SIGKILL after `grace`."""
        with self.lock:
            self.stopping.set()
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.stopped.set()


def worker_commands(a, home: Path, db: str) -> list[tuple[list[str], dict]]:
    gpus = visible_gpus()
    base = [sys.executable, "-m", "service.cli", "worker", "--home", str(home), "--db", db, "--lease", str(a.lease),
            "--parent-pid", str(os.getpid()), *policy.from_args(a).worker_args()]
    n = a.workers if a.workers is not None else (gpus or a.cpu_slots)
    out = []
    for i in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        out.append((base + ["--device", "cuda" if gpus else "cpu"], env))
    return out


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def largest_worker_gb(n_workers: int) -> float | None:
    """The memory budget of the largest local worker (GPU memory, or host memory for CPU slots);
    None without local workers (remote workers are not known here)."""
    if n_workers == 0:
        return None
    from .worker import device_memory_gb
    gpus = visible_gpus()
    return max(device_memory_gb(f"cuda:{i}") for i in range(gpus)) if gpus else device_memory_gb("cpu")


def _exit_on(signum, _frame):
    raise SystemExit(128 + signum)


def cmd_serve(a) -> int:
    import uvicorn

    from .api import Settings, create_app
    from .auth import Auth, ensure_tokens_file
    from .store import Store, migrate
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = a.home or default_home()
    db = a.db or default_db(home)
    migrate(Store(db).engine)
    tokens = a.tokens or ensure_tokens_file(home)
    commands = worker_commands(a, home, db)
    app = create_app(Settings(db, home, Auth.from_file(tokens), a.lease, a.max_attempts, policy.from_args(a),
                              largest_worker_gb(len(commands))))
    # uvicorn re-raises the signal that stopped it once it has shut down: with Python's default SIGTERM
    # action the process would die there and never reach `finally`; this makes it an exit that does
    signal.signal(signal.SIGTERM, _exit_on)
    sup = Supervisor(commands)
    sup.start()
    print(f"quantfarm: API on http://{a.host}:{a.port}/v1 (docs at /docs), {len(sup.commands)} worker(s), "
          f"store {db.split('@')[-1]}, tokens in {tokens}", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()
    return 0
