"""`quantfarm serve` (the API plus local workers) and `quantfarm worker` (workers for a shared store).

serve runs uvicorn in this process and the local workers under a supervisor (farm/supervisor.py).
Shutdown: SIGTERM and SIGINT stop the workers (each hands its job back at the next layer boundary)
before serve exits.
"""
import argparse
import logging
import signal
import sys
from pathlib import Path

from service.farm import policy
from service.farm.home import default_db, default_home

from .args import HelpWithDefaults


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
    p.add_argument("--allow-weak-tokens", action="store_true",
                   help="start even if a token is shorter than 16 characters or the tokens file is readable by "
                        "group or others (each is logged); without it the server refuses to start")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per visible GPU, else --cpu-slots; 0: API only)")
    p.add_argument("--cpu-slots", type=int, default=1, help="CPU workers when no GPU is visible")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: each job a Ray task on a Ray cluster, "
                        "placed by its GPU (or CPU) and memory needs (HOME must be the same path on every node)")
    p.add_argument("--ray-address", default="auto",
                   help="executor ray: the cluster (ray://HOST:10001 or HOST:6379); auto starts a Ray on this machine")
    p.add_argument("--ray-cpus-per-job", type=float, default=1.0,
                   help="executor ray on a cluster without GPUs: CPUs each job asks for")
    p.add_argument("--max-attempts", type=int, default=3, help="runs a job gets before a lost worker fails it")
    p.add_argument("--schedule", type=Path, metavar="BATCH.yaml", help="run this batch file on --cron (nightly "
                   "re-quantization); several serve processes on one store run each firing once")
    p.add_argument("--cron", default="0 2 * * *", help="when --schedule fires (cron, UTC; a sixth field is seconds)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="nightly batches: run a batch file now, or show runs", formatter_class=fmt)
    bsub = p.add_subparsers(dest="batch_command", required=True)
    r = bsub.add_parser("run", help="pin every model's current revision and build what is not built yet",
                        formatter_class=fmt)
    r.add_argument("file", type=Path, help="batch YAML: name, models (model, track, preset|variants), preset|variants, "
                                           "calibration, evaluation, publish, gate (min_recovery, max_regression)")
    _common(r)
    r.add_argument("--wait", action="store_true", help="wait for every job and print the night report; what it waits "
                                                       "for goes to stderr every 30 s")
    r.add_argument("--no-worker-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="--wait: fail (exit 2) when no worker has been alive on the store this long (0: wait for ever)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_batch_run)

    p = sub.add_parser("worker", help="run workers against a (shared) job store", formatter_class=fmt)
    _common(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)     # set by serve: exit when it is gone
    p.set_defaults(func=cmd_worker)


def check_storage(a) -> None:
    if a.storage:
        from service.job.blobstore import BlobStore
        BlobStore(a.storage).check()


def cmd_worker(a) -> int:
    from service.farm.worker import work
    check_storage(a)
    from service.job.context import pick_device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = a.home or default_home()
    device = str(pick_device(a.device))
    work(a.db or default_db(home), home, device=device, lease_seconds=a.lease, policy=policy.from_args(a),
         parent_pid=a.parent_pid)
    return 0


def _exit_on(signum, _frame):
    raise SystemExit(128 + signum)


def cmd_serve(a) -> int:
    from service.farm.auth import Auth, ensure_tokens_file
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = a.home or default_home()
    tokens = a.tokens or ensure_tokens_file(home)
    auth = Auth.from_file(tokens, allow_weak=a.allow_weak_tokens)      # a bad tokens file stops serve first

    import uvicorn

    from service.farm.api import FarmSettings, create_app
    from service.farm.store import Store, migrate
    from service.farm.supervisor import Supervisor, largest_worker_gb, worker_commands
    db = a.db or default_db(home)
    migrate(Store(db).engine)
    check_storage(a)
    if a.executor == "ray":                 # Ray places the jobs; the store learns node budgets from their beats
        from service.farm.ray_executor import RayExecutor
        sup, budget = RayExecutor(db, home, a.lease, policy.from_args(a), a.ray_address, a.ray_cpus_per_job), None
        where = f"Ray executor ({a.ray_address})"
    else:
        commands = worker_commands(a, home, db)
        sup, budget = Supervisor(commands), largest_worker_gb(len(commands))
        where = f"{len(commands)} worker(s)"
    app = create_app(FarmSettings(db, home, auth, a.lease, a.max_attempts, policy.from_args(a),
                                  budget, a.schedule, a.cron if a.schedule else None))
    # uvicorn re-raises the signal that stopped it once it has shut down: with Python's default SIGTERM
    # action the process would die there and never reach `finally`; this makes it an exit that does
    signal.signal(signal.SIGTERM, _exit_on)
    sup.start()
    from service.farm import docs
    print(f"quantfarm: API on http://{a.host}:{a.port}/v1 ({docs.banner(auth)}), {where}, "
          f"store {db.split('@')[-1]}, tokens in {tokens}", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()
    return 0


def cmd_batch_run(a) -> int:
    """Submit the batch to the farm's store (as serve's scheduler would, admin rights, the policy given
    here); the farm's workers build it."""
    import json

    from service.farm import admission, batch
    from service.farm.store import Store, migrate
    home = a.home or default_home()
    store = Store(a.db or default_db(home), a.lease)
    migrate(store.engine)
    pol = policy.from_args(a)
    spec = batch.load(a.file)
    run = batch.start(store, spec, pin=lambda rs: admission.pin(rs, admin=True, policy=pol),
                      admit=lambda job, src: admission.admit(job, admin=True, policy=pol,
                                                             artifact_root=home / "artifacts",
                                                             worker_memory_gb=None, src=src))
    show = (lambda rep: print(json.dumps(rep, indent=2) if a.json else batch.markdown(rep), flush=True))
    try:
        if a.wait:
            rep = batch.wait(store, run, home, no_worker_timeout=a.no_worker_timeout or None,
                             on_status=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            rep = batch.report(store, run)
            if batch.all_refused(rep):
                raise batch.NothingRuns(f"every model of batch {spec.name} was refused ({len(rep['refused'])}); "
                                        "nothing was queued: the reasons are in the report", rep)
    except batch.NothingRuns as e:
        show(e.report)                  # the reasons, and what was queued
        raise
    show(rep)
    return 0 if rep["counts"]["failed"] == 0 or not a.wait else 3
