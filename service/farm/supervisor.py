"""Local worker processes for `quantfarm serve`: one per visible GPU (CUDA_VISIBLE_DEVICES set per
worker), or --cpu-slots CPU workers when there is none. The supervisor thread restarts a worker that
dies (its job goes back to the queue when the lease expires and resumes from its per-layer state);
stop() hands every job back at the next layer boundary before serve exits, and workers also die with
serve if it is killed outright (see worker.py), so a restarted serve never runs beside orphans."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import policy


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
