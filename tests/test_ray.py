"""`serve --executor ray` on a real multi-node Ray cluster on this machine (Ray's own cluster_utils: a head and
worker nodes, each its own raylet and processes; one CPU per node stands in for a GPU): jobs spread over the
nodes, run in priority order, cancel reaches a running task, and a job whose node is killed mid-quantization
resumes on another node to tensors equal to an uninterrupted run. Every Ray here asks for a token, as
quantfarm's do: one that refuses a driver without it is checked on this machine's loopback."""
import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from test_service import SMALL, Server, auth
from tiny import save_tiny

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head that runs no jobs (0 CPUs) and no worker node yet: each test adds the nodes it needs. It asks
    for a token, as compose.yaml's and KubeRay's do; the serve processes of the tests get it from this
    process's environment (RAY_AUTH_TOKEN_PATH), the operator's way."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster
    token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    token.write_text("cluster-token-" + os.urandom(16).hex())
    token.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        reset_auth_token_state()            # this process read Ray's settings when `ray` was imported
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        c.token = token
        yield c
        c.shutdown()
    reset_auth_token_state()


def driver(address: str, home: Path, **env) -> str:
    """A Ray driver in a fresh process of this machine with only the `env` given of Ray's: 'CONNECTED' and a
    task's result, or 'REFUSED' and why. 127.0.0.1 stays 127.0.0.1 (Ray's single-machine mode; a cluster-mode
    driver would dial the machine's outside address instead), and it gives up after 2 tries, not 20."""
    code = ("import ray\ntry:\n"
            f"    ray.init(address={address!r}, log_to_driver=False)\n"
            "    print('CONNECTED', ray.get(ray.remote(lambda: 42).remote()))\n"
            "except Exception as e:\n    print('REFUSED', repr(e.__cause__ or e))\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**base, "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                            "RAY_NUM_REDIS_GET_RETRIES": "2", **env})
    return r.stdout.strip() or r.stderr[-2000:]


def listening(procs: list) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket these processes listen on."""
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback


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


def test_auto_starts_a_private_ray_of_its_own(tmp_path, monkeypatch):
    """`--ray-address auto`: serve starts a Ray on this machine and runs the job there. That Ray asks for a
    token serve made for it, kept in a 0600 file in a 0700 folder with Ray's session (nothing in ~/.ray, where
    Ray would write one readable by all, nor in the shared /tmp/ray), refuses a driver without it and lets
    one with it in, and every socket of its processes listens on loopback; it goes with serve, folder too."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    user = tmp_path / "user"
    user.mkdir()
    models = tmp_path / "models"
    folder = str(save_tiny(models / "tiny", "llama", layers=2))
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0, env={"HOME": str(user)},
                 args=("--executor", "ray", "--ray-address", "auto", "--model-root", str(models)))
    try:
        job = srv.wait(srv.submit(tiny_spec(folder, seed=0)).json()["id"], timeout=240)
        assert job["state"] == "succeeded" and len(node_of(srv, job["id"])) == 1, job
        procs = psutil.Process(srv.proc.pid).children(recursive=True)
        gcs = next(p for p in procs if p.name() == "gcs_server")
        env = gcs.environ()
        token = Path(env["RAY_AUTH_TOKEN_PATH"])
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
        assert len(token.read_text()) >= 40 and not (user / ".ray").exists()
        raylet = next(p for p in procs if p.name() == "raylet")
        for p in (gcs, raylet):                          # its session (logs, sockets) beside the token
            assert any(str(token.parent / "ray" / "session_") in a for a in p.cmdline()), p.cmdline()
            assert not any("/tmp/ray/" in a for a in p.cmdline()), p.cmdline()
        sockets = listening(procs)
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names and len(sockets) >= 5, sockets
        assert all(loopback(ip) for _, ip, _ in sockets), sockets
        address = f"127.0.0.1:{next(port for name, _, port in sockets if name == 'gcs_server')}"
        refused = driver(address, user)
        assert refused.startswith("REFUSED") and "InvalidAuthToken" in refused, refused
        assert driver(address, user, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)) == "CONNECTED 42"
    finally:
        srv.close()
    psutil.wait_procs(procs, timeout=30)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not token.parent.exists()


def test_a_cluster_asks_for_its_token(tmp_path, cluster, monkeypatch):
    """The cluster refuses a driver with another token; serve will not connect to a cluster without one, nor
    with a token file that other users can read (each error says what to do)."""
    from core.errors import QuantfarmError
    from service.farm.policy import Policy
    from service.farm.ray_executor import RayExecutor, cluster_token
    refused = driver(cluster.address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 43)
    assert refused.startswith("REFUSED") and "InvalidAuthToken" in refused, refused
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    executor = RayExecutor(f"sqlite:///{tmp_path}/store.db", tmp_path, 6, Policy(), cluster.address)
    with pytest.raises(QuantfarmError, match="no Ray token; give serve the cluster's token in RAY_AUTH_TOKEN"):
        executor.start()
    assert not executor.is_alive()
    open_token = tmp_path / "open-token"
    open_token.write_text(cluster.token.read_text())
    open_token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(open_token))
    with pytest.raises(QuantfarmError, match=f"open to every user: chmod 600 {open_token}"):
        cluster_token(cluster.address)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(QuantfarmError, match="connects only to a Ray with token authentication"):
        cluster_token(cluster.address)


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
    services start Ray against the head they name, and the KubeRay cluster runs the Ray version pinned here.
    Every Ray process there, and the API, has token auth and the one token; the head publishes no port
    beyond this host's loopback, and its dashboard stays on the pod's."""
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
    for s in ray_services.values():
        assert s["environment"]["RAY_AUTH_MODE"] == "token", s
        assert s["environment"]["RAY_AUTH_TOKEN"] == "${QUANTFARM_RAY_TOKEN:-}", s
    assert all(p.startswith("127.0.0.1:") for p in ray_services["ray-head"]["ports"])
    assert "ports" not in ray_services["ray-worker"]
    docs = list(yaml.safe_load_all((root / "deploy" / "kuberay.yaml").read_text()))
    cluster, deployment = docs[0], docs[1]
    pinned = re.search(r'ray = \["ray==([0-9.]+)"\]', (root / "pyproject.toml").read_text()).group(1)
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == pinned == ray.__version__
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    a = parser.parse_args(container["args"])
    assert a.executor == "ray" and a.ray_address == f"{cluster['metadata']['name']}-head-svc:6379"
    assert a.storage.startswith("s3://")
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = {"secretKeyRef": {"name": auth["secretName"], "key": "auth_token"}}
    assert {"name": "RAY_AUTH_TOKEN", "valueFrom": secret} in container["env"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert [p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]] == [6379]
