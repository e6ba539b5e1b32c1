"""Jobs per hour on the farm: N tiny-model jobs through `serve` with the local executor (one worker process)
and with the Ray executor on a Ray cluster of 1, 2 and 3 nodes on this machine (Ray's cluster_utils; one CPU
per node). Prints, per setting, the wall seconds from the first submission to the last job's end, jobs per
hour, and the mean seconds per job as the job reports it (its own pipeline time) against the wall time per
job: the difference is what the executor adds (claiming, placing, starting the task, storage mirroring).

    .venv/bin/python bench/ray_jobs.py [--jobs 12] [--layers 8] [--samples 8 --seq-len 64] [--storage]

On a 2-core machine more nodes cannot run more than two jobs at once: the numbers show the executor's
overhead and its scaling up to the cores there are, not a cluster's throughput.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_service import Server  # noqa: E402
from tiny import save_tiny  # noqa: E402


def run(tmp: Path, args: tuple, n: int, folder: str, layers_seed: int, samples: int, seq_len: int) -> dict:
    srv = Server(tmp / "home", f"sqlite:///{tmp}/store.db", workers=0 if "--executor" in args else 1,
                 args=("--model-root", str(Path(folder).parent), *args))
    try:
        t0 = time.perf_counter()
        ids = [srv.submit({"model": folder, "group_size": 32, "evaluation": {"suite": "none"},
                           "calibration": {"source": "model", "samples": samples, "seq_len": seq_len,
                                           "seed": layers_seed + i}}).json()["id"] for i in range(n)]
        jobs = [srv.wait(j, timeout=1800) for j in ids]
        wall = time.perf_counter() - t0
    finally:
        srv.close()
    bad = [j for j in jobs if j["state"] != "succeeded"]
    if bad:
        raise SystemExit(f"{len(bad)} jobs did not succeed: {bad[0]}")
    own = sum(j["result"]["seconds"]["total"] for j in jobs) / n
    return {"wall": wall, "per_hour": 3600 * n / wall, "job_seconds": own, "wall_per_job": wall / n}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--layers", type=int, default=8, help="layers of the tiny Llama each job quantizes")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--storage", action="store_true", help="Ray runs with --storage file://... (state mirrored)")
    a = p.parse_args()
    from ray.cluster_utils import Cluster
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = str(save_tiny(root / "models" / "tiny", "llama", layers=a.layers))
        rows.append(("local, 1 worker", run(root / "local", (), a.jobs, folder, 0, a.samples, a.seq_len)))
        for nodes in (1, 2, 3):
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(nodes):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            try:
                extra = ("--storage", (root / f"store{nodes}").as_uri()) if a.storage else ()
                rows.append((f"ray, {nodes} node(s)", run(root / f"ray{nodes}", ("--executor", "ray", "--ray-address",
                                                                                 c.address, *extra),
                                                           a.jobs, folder, 1000 * nodes, a.samples, a.seq_len)))
            finally:
                c.shutdown()
    print(f"{a.jobs} jobs, tiny Llama of {a.layers} layers, GPTQ w4 g32, {a.samples} x {a.seq_len} calibration tokens"
          + (", Ray with --storage file://" if a.storage else ""))
    print(f"{'executor':<18} {'wall s':>8} {'jobs/h':>8} {'job s':>7} {'wall s/job':>11}")
    for name, r in rows:
        print(f"{name:<18} {r['wall']:8.1f} {r['per_hour']:8.0f} {r['job_seconds']:7.2f} {r['wall_per_job']:11.2f}")


if __name__ == "__main__":
    main()
