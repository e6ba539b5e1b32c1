"""`quantfarm serve` (the API plus local workers) and `quantfarm worker` (workers for a shared store).

serve runs uvicorn in this process and one worker process per visible GPU (CUDA_VISIBLE_DEVICES
set per worker), or --cpu-slots CPU workers when there is none; a supervisor thread restarts a
worker that dies (its job goes back to the queue when the lease expires and resumes from its
checkpoint). Everything lives under HOME (QUANTFARM_HOME, default ~/.quantfarm): the SQLite store,
tokens.json, artifacts/ and per-job state/.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("QUANTFARM_HOME", "~/.quantfarm")).expanduser()


def default_db(home: Path) -> str:
    return os.environ.get("QUANTFARM_DB") or f"sqlite:///{home / 'quantfarm.db'}"


def _common(p):
    p.add_argument("--home", type=Path, default=None, help="data folder (QUANTFARM_HOME, default ~/.quantfarm)")
    p.add_argument("--db", help="database URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
                                "(QUANTFARM_DB; default sqlite under HOME)")
    p.add_argument("--lease", type=float, default=30.0, help="seconds a worker's lease lasts without a heartbeat")


def add_parsers(sub):
    p = sub.add_parser("serve", help="run the HTTP API and local worker processes")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--tokens", type=Path, help="tokens file (default HOME/tokens.json, created with an admin token)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per visible GPU, else --cpu-slots; 0: API only)")
    p.add_argument("--cpu-slots", type=int, default=1, help="CPU workers when no GPU is visible")
    p.add_argument("--max-attempts", type=int, default=3, help="runs a job gets before a lost worker fails it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run workers against a (shared) job store")
    _common(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_worker)


def cmd_worker(a) -> int:
    from .pipeline import pick_device
    from .worker import work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = a.home or default_home()
    device = str(pick_device(a.device))
    work(a.db or default_db(home), home, device=device, lease_seconds=a.lease)
    return 0


class Supervisor(threading.Thread):
    """Keeps `n` worker processes alive; restarts one that exits (at most once per 5 s)."""

    def __init__(self, commands: list[tuple[list[str], dict]]):
        super().__init__(daemon=True)
        self.commands = commands
        self.procs: list[subprocess.Popen | None] = [None] * len(commands)
        self.stopping = threading.Event()

    def run(self):
        last = [0.0] * len(self.commands)
        while not self.stopping.is_set():
            for i, (cmd, env) in enumerate(self.commands):
                p = self.procs[i]
                if (p is None or p.poll() is not None) and time.time() - last[i] > 5:
                    if p is not None:
                        logging.getLogger("quantfarm.serve").warning("worker %d exited (%s); restarting", i, p.returncode)
                    self.procs[i] = subprocess.Popen(cmd, env=env)
                    last[i] = time.time()
            self.stopping.wait(0.5)

    def stop(self):
        self.stopping.set()
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def worker_commands(a, home: Path, db: str) -> list[tuple[list[str], dict]]:
    import torch
    base = [sys.executable, "-m", "service.cli", "worker", "--home", str(home), "--db", db, "--lease", str(a.lease)]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = a.workers if a.workers is not None else (gpus or a.cpu_slots)
    out = []
    for i in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        out.append((base + ["--device", "cuda" if gpus else "cpu"], env))
    return out


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
    app = create_app(Settings(db, home, Auth.from_file(tokens), a.lease, a.max_attempts))
    sup = Supervisor(worker_commands(a, home, db))
    sup.start()
    print(f"quantfarm: API on http://{a.host}:{a.port}/v1 (docs at /docs), {len(sup.commands)} worker(s), "
          f"store {db.split('@')[-1]}, tokens in {tokens}", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        sup.stop()
    return 0
