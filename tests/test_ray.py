"""`serve --executor ray` on a real multi-node Ray cluster on this machine (Ray's own cluster_utils: a head and
worker nodes, each its own raylet and processes; one CPU per node stands in for a GPU): jobs spread over the
nodes, run in priority order, cancel reaches a running task, and a job whose node is killed mid-quantization
resumes on another node to tensors equal to an uninterrupted run."""
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_service import SMALL, Server, auth
from tiny import save_tiny

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no jobs (0 CPUs) and no worker node yet: each test adds the nodes it needs."""
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield c
    c.shutdown()


def node_of(srv: Server, job_id: str) -> list[str]:
    """The Ray nodes a job ran on, in order (from its log)."""
    log = srv.http.get(f"/v1/jobs/{job_id}/logs", headers=auth("reader")).text
    return [line.split("running on node ")[1].split()[0] for line in log.splitlines() if "running on node " in line]


def serve(tmp_path, cluster, models: Path | None = None, storage: str | None = None) -> Server:
    args = ("--executor", "ray", "--ray-address", cluster.address, "--lease", "6",
            *(("--model-root", str(models)) if models else ()), *(("--storage", storage) if storage else ()))
    return Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0, args=args)


def tiny_spec(folder, seed: int, priority: int = 0) -> dict:
    return {"model": folder, "group_size": 32, "priority": priority, "evaluation": {"suite": "none"},
            "calibration": {"source": "model", "samples": 4, "seq_len": 32, "seed": seed}}


def test_auto_starts_a_ray_of_its_own(tmp_path, monkeypatch):
    """`--ray-address auto`: serve starts a Ray on this machine and runs the job there (before any test
    cluster of this module exists); the Ray goes with serve."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    models = tmp_path / "models"
    folder = str(save_tiny(models / "tiny", "llama", layers=2))
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0,
                 args=("--executor", "ray", "--ray-address", "auto", "--model-root", str(models)))
    try:
        job = srv.wait(srv.submit(tiny_spec(folder, seed=0)).json()["id"], timeout=240)
        assert job["state"] == "succeeded" and len(node_of(srv, job["id"])) == 1, job
    finally:
        srv.close()


def test_priorities_then_spread_over_nodes(tmp_path, cluster):
    """Jobs queued while the cluster has no room start in priority order once one node comes (one slot:
    one job at a time); with three nodes they run side by side on different nodes."""
    models = tmp_path / "models"
    folder = str(save_tiny(models / "tiny", "llama", layers=2))
    srv = serve(tmp_path, cluster, models)
    nodes = []
    try:
        ids = {p: srv.submit(tiny_spec(folder, seed=i, priority=p)).json()["id"]
               for i, p in enumerate([0, 5, -5, 10])}
        time.sleep(2)
        assert all(srv.job(j)["state"] == "queued" for j in ids.values())          # no node can take one
        nodes.append(cluster.add_node(num_cpus=1))
        done = {p: srv.wait(j, timeout=240) for p, j in ids.items()}
        assert all(j["state"] == "succeeded" for j in done.values()), done
        started = sorted(done, key=lambda p: done[p]["timings"]["started_at"])
        assert started == [10, 5, 0, -5]
        nodes += [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
        cluster.wait_for_nodes()
        batch = [srv.submit(tiny_spec(folder, seed=10 + i)).json()["id"] for i in range(6)]
        assert all(srv.wait(j, timeout=240)["state"] == "succeeded" for j in batch)
        used = {n for j in batch for n in node_of(srv, j)}
        assert len(used) >= 2, used
        assert used <= {n.node_id for n in nodes}                                 # never the head (0 CPUs)
    finally:
        srv.close()
        for n in nodes:
            cluster.remove_node(n)


def test_cancel_and_a_killed_node(tmp_path, cluster):
    """Cancel stops a running Ray task at a layer boundary. A job whose node is killed mid-quantization goes
    back to the queue and resumes on the other node from its last layer, taken from the storage URL (each
    node computes in its own scratch folder), to the tensors of a run that was never interrupted."""
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    storage = tmp_path / "storage"
    srv = serve(tmp_path, cluster, storage=storage.as_uri())
    spec = {**SMALL, "evaluation": {"suite": "none"}}
    try:
        job_id = srv.submit({**spec, "priority": 1}).json()["id"]
        srv.wait(job_id, until=lambda j: (j["progress"]["layers_done"] or 0) >= 2, timeout=240)
        assert srv.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice")).status_code == 200
        job = srv.wait(job_id, timeout=60)
        assert job["state"] == "cancelled" and job["progress"]["layers_done"] < 30, job

        job_id = srv.submit(spec).json()["id"]
        running = srv.wait(job_id, until=lambda j: (j["progress"]["layers_done"] or 0) >= 4, timeout=240)
        first = node_of(srv, job_id)[0]
        killed_at = running["progress"]["layers_done"]
        cluster.remove_node(next(n for n in nodes if n.node_id == first))
        job = srv.wait(job_id, timeout=400)
        assert job["state"] == "succeeded" and job["attempt"] == 2, job
        ran = node_of(srv, job_id)
        assert ran[0] == first and ran[-1] != first, ran
        log = srv.http.get(f"/v1/jobs/{job_id}/logs", headers=auth("reader")).text
        assert "ray task of" in log and "resuming from the per-layer state" in log
        assert f"state files from {storage.as_uri()}/state/{job_id}" in log
        resumed = log.splitlines()[next(i for i, line in enumerate(log.splitlines()) if "attempt 2: resuming" in line):]
        first_layer = next(line for line in resumed if "layer layer " in line)
        assert int(first_layer.split("layer layer ")[1].split("/")[0]) > killed_at - 1, first_layer

        ref = srv.wait(srv.submit(spec, force="true").json()["id"], timeout=400)
        assert ref["state"] == "succeeded" and ref["attempt"] == 1
        assert job["result"]["artifact"] == f"{storage.as_uri()}/artifacts/{job_id}"
        a = load_file(storage / "artifacts" / job_id / "model.safetensors")
        b = load_file(storage / "artifacts" / ref["id"] / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    finally:
        srv.close()
        for n in nodes:
            if n in cluster.worker_nodes:
                cluster.remove_node(n)


def test_deployment_files_run_commands_quantfarm_takes():
    """compose.yaml's and the KubeRay example's quantfarm commands parse with quantfarm's own parser, their Ray
    services start Ray against the head they name, and the KubeRay cluster runs the Ray version pinned here."""
    import argparse
    import re

    import yaml

    from service.cli import client, farm, release
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="quantfarm")
    sub = parser.add_subparsers(dest="command", required=True)
    from service.cli.main import _quantize_parser
    _quantize_parser(sub)
    farm.add_parsers(sub)
    release.add_parsers(sub)
    client.add_parsers(sub, lambda p: None, lambda a: None)
    services = yaml.safe_load((root / "compose.yaml").read_text())["services"]
    ray_services = {n: s for n, s in services.items() if "ray" in s.get("profiles", [])}
    assert set(ray_services) == {"ray-head", "ray-worker", "api-ray"}
    api = parser.parse_args(ray_services["api-ray"]["command"])
    assert api.executor == "ray" and api.ray_address == "ray-head:6379" and api.storage.startswith("file:///data")
    assert "data:/data" in ray_services["ray-worker"]["volumes"]                 # the storage every node sees
    assert ray_services["ray-worker"]["command"][:3] == ["start", "--address", "ray-head:6379"]
    assert "6379" in ray_services["ray-head"]["command"]
    for name in ("api", "worker"):
        parser.parse_args(services[name]["command"])
    docs = list(yaml.safe_load_all((root / "deploy" / "kuberay.yaml").read_text()))
    cluster, deployment = docs[0], docs[1]
    pinned = re.search(r'ray = \["ray==([0-9.]+)"\]', (root / "pyproject.toml").read_text()).group(1)
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == pinned == ray.__version__
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    a = parser.parse_args(container["args"])
    assert a.executor == "ray" and a.ray_address == f"{cluster['metadata']['name']}-head-svc:6379"
    assert a.storage.startswith("s3://")
