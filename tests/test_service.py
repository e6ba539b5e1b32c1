"""The job service for real: `quantfarm serve` (uvicorn on a loopback port) with real worker
processes, SQLite and PostgreSQL stores, the demo model, SIGKILL in the middle of a job."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from service.farm.store import TERMINAL, Store, migrate

PG_URL = os.environ.get("QUANTFARM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
TOKENS = {"admin": "adm-" + "x" * 20, "alice": "sub-" + "a" * 20, "bob": "sub-" + "b" * 20, "reader": "rd-" + "r" * 20}
SMALL = {"model": "smollm2-135m", "calibration": {"samples": 4, "seq_len": 64},
         "evaluation": {"windows": 2, "window_len": 64}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def tokens_file(folder: Path, extra: list | None = None, **settings) -> Path:
    """Owner-only, as serve requires; bob queues hundreds of jobs in the load tests, so he has no queue quota."""
    path = folder / "tokens-test.json"
    path.write_text(json.dumps({**settings, "tokens": [
        {"name": "admin", "token": TOKENS["admin"], "roles": ["admin"]},
        {"name": "alice", "token": TOKENS["alice"], "roles": ["submit"]},
        {"name": "bob", "token": TOKENS["bob"], "roles": ["submit"], "limits": {"max_active_jobs": None}},
        {"name": "reader", "token": TOKENS["reader"], "roles": ["read"]}, *(extra or [])]}))
    path.chmod(0o600)
    return path


class Server:
    """`quantfarm serve` in its own process group (session), so close() can reap its workers too."""

    def __init__(self, home: Path, db: str, workers: int, lease: float = 30.0, args: tuple = (),
                 tokens: Path | None = None, own_tokens: bool = False, wait: bool = True, env: dict | None = None):
        """`own_tokens`: no --tokens, so serve creates HOME/tokens.json with its admin token. `env`: on top of
        this environment (which is offline: HF_HUB_OFFLINE=1)."""
        home.mkdir(parents=True, exist_ok=True)
        tokens_args = () if own_tokens else ("--tokens", str(tokens or tokens_file(home)))
        self.home = home
        self.log = open(home / "serve.log", "a")
        self._argv = lambda port: [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--db", db,
                                   "--port", str(port), "--workers", str(workers), "--lease", str(lease),
                                   *tokens_args, *args]
        self._env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._start()
        if wait:
            self.wait_healthy()

    def _start(self):
        """serve on a port free a moment ago (another process may take it before serve binds: wait_healthy
        then starts it again on another)."""
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_from = self.log.tell()
        self.proc = subprocess.Popen(self._argv(self.port), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self._env)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_healthy(self, timeout: float = 90, rebinds: int = 3):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None and rebinds:
                self.log.flush()
                with open(self.home / "serve.log") as f:
                    f.seek(self._log_from)
                    if "address already in use" in f.read():      # lost the port race: not what is tested
                        rebinds -= 1
                        self._start()
                        continue
            assert self.proc.poll() is None, (self.home / "serve.log").read_text()[-3000:]
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not come up")

    def workers(self) -> list[int]:
        """Pids of the worker processes serve started (they share its process group)."""
        return group_pids(self.proc.pid, exclude=self.proc.pid)

    def submit(self, spec: dict, who: str = "alice", **params) -> httpx.Response:
        return self.http.post("/v1/jobs", json=spec, headers=auth(who), params=params)

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}", headers=auth("reader")).json()

    def wait(self, job_id: str, until=lambda j: j["state"] in TERMINAL,
             timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if until(j):
                return j
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} stuck: {self.job(job_id)}")

    def close(self):
        """SIGTERM to serve (it stops its workers), then SIGKILL to whatever of its group is left: no
        worker outlives its test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_group(self.proc.pid)
        self.http.close()
        self.log.close()


def group_pids(pgid: int, exclude: int | None = None) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == exclude:
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {e}")
    name = f"qf_test_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE DATABASE {name}")
    yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    conn.execute(f"DROP DATABASE IF EXISTS {name}")
    conn.close()


def _demo_job(tmp_path, db):
    srv = Server(tmp_path / "home", db, workers=1)
    try:
        r = srv.submit(SMALL)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        events = []
        with srv.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth("reader"),
                             timeout=httpx.Timeout(60, read=300)) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
        job = srv.job(job_id)
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"layers_done": 30, "layers_total": 30}
        assert [d["message"] for k, d in events if k == "state"] == ["queued", "running", "succeeded"]
        assert [d["done"] for k, d in events if k == "layer"] == list(range(1, 31))
        assert {"resolve", "calibrate", "quantize", "save", "evaluate artifact"} <= {d["message"] for k, d in events
                                                                                    if k == "step"}
        (art,) = job["artifacts"]
        assert art["published"] and art["format"] == "gptq"
        files = srv.http.get(f"/v1/artifacts/{art['id']}", headers=auth("reader")).json()["files"]
        names = {f["path"] for f in files}
        assert {"config.json", "model.safetensors", "report.json", "quantize_config.json"} <= names
        report = srv.http.get(f"/v1/artifacts/{art['id']}/files/report.json", headers=auth("reader")).json()
        assert report == srv.http.get(f"/v1/jobs/{job_id}/report", headers=auth("reader")).json()
        assert report["perplexity"]["quantized"] == job["result"]["perplexity"]["quantized"]
        cfg = srv.http.get(f"/v1/artifacts/{art['id']}/files/config.json", headers=auth("reader")).json()
        assert cfg["quantization_config"]["quant_method"] == "gptq"
        for bad in ("../tokens-test.json", "..%2F..%2Fquantfarm.db", "%2Fetc%2Fpasswd"):
            r = srv.http.get(f"/v1/artifacts/{art['id']}/files/{bad}", headers=auth("reader"))
            assert r.status_code in (400, 404) and "root:" not in r.text and "adm-" not in r.text, (bad, r.text)
        logs = srv.http.get(f"/v1/jobs/{job_id}/logs", headers=auth("reader")).text
        assert "layer 30/30" in logs and "succeeded" in logs
        metrics = srv.http.get("/metrics", headers=auth("reader")).text
        assert 'quantfarm_jobs{state="succeeded"} 1.0' in metrics and "quantfarm_queue_depth 0.0" in metrics
        assert "quantfarm_job_duration_seconds_count 1.0" in metrics
        return job
    finally:
        srv.close()


@pytest.mark.slow
def test_demo_job_sqlite(tmp_path):
    _demo_job(tmp_path, f"sqlite:///{tmp_path}/store.db")


@pytest.mark.slow
def test_demo_job_postgresql(tmp_path, pg_url):
    job = _demo_job(tmp_path, pg_url)
    rows, total = Store(pg_url).list_jobs()
    assert total == 1 and rows[0]["id"] == job["id"] and rows[0]["state"] == "succeeded"


@pytest.mark.slow
def test_sigkill_mid_quantization_resumes_to_identical_tensors(tmp_path):
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1, lease=3)
    spec = {**SMALL, "evaluation": {"suite": "none"}}
    try:
        job_id = srv.submit(spec).json()["id"]
        running = srv.wait(job_id, until=lambda j: (j["progress"]["layers_done"] or 0) >= 4, timeout=240)
        assert running["state"] == "running" and running["progress"]["layers_done"] < 30, running
        pid = int(running["worker"].split(":")[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = running["progress"]["layers_done"]
        job = srv.wait(job_id, timeout=300)
        assert job["state"] == "succeeded" and job["attempt"] == 2, job
        assert f":{pid}:" not in job["worker"]
        lines = srv.http.get(f"/v1/jobs/{job_id}/logs", headers=auth("reader")).text.splitlines()
        assert any("lease of" in line for line in lines)
        resumed = next(i for i, line in enumerate(lines) if "attempt 2: resuming" in line)
        first_after = next(line for line in lines[resumed:] if "layer layer " in line)
        # checkpoints are written before progress is reported: nothing seen done is redone
        assert int(first_after.split("layer layer ")[1].split("/")[0]) > killed_at, first_after

        ref_id = srv.submit(spec, force="true").json()["id"]
        assert ref_id != job_id
        ref = srv.wait(ref_id, timeout=300)
        assert ref["state"] == "succeeded" and ref["attempt"] == 1
        a = load_file(Path(job["result"]["artifact"]) / "model.safetensors")
        b = load_file(Path(ref["result"]["artifact"]) / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]
    finally:
        srv.close()


@pytest.mark.slow
def test_cancel_running_job_at_layer_boundary(tmp_path):
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1)
    try:
        job_id = srv.submit({**SMALL, "evaluation": {"suite": "none"}}).json()["id"]
        srv.wait(job_id, until=lambda j: (j["progress"]["layers_done"] or 0) >= 2, timeout=240)
        assert srv.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("bob")).status_code == 403
        r = srv.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice"))
        assert r.status_code == 200 and r.json()["cancel_requested"]
        job = srv.wait(job_id, timeout=60)
        assert job["state"] == "cancelled" and job["progress"]["layers_done"] < 30, job
        assert job["artifacts"] == []
        assert srv.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice")).status_code == 409
    finally:
        srv.close()


def test_api_contract_auth_validation_dedup_and_concurrency(tmp_path):
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0)
    try:
        h = srv.http
        # auth: no token, unknown token, wrong role
        assert h.get("/v1/jobs").status_code == 401
        assert h.post("/v1/jobs", json=SMALL).status_code == 401
        assert h.post("/v1/jobs", json=SMALL, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = srv.submit(SMALL, who="reader")
        assert r.status_code == 403 and "submit" in r.json()["detail"]
        # malformed specs: 422 naming the field
        for bad, field in (({**SMALL, "bits": 5}, "bits"), ({**SMALL, "group_size": 0}, "group_size"),
                           ({**SMALL, "calibration": {"samples": 0}}, "calibration.samples"),
                           ({**SMALL, "colour": "blue"}, "colour"), ({"bits": 4}, "model"),
                           ({**SMALL, "publish": ["s3"]}, "publish"),
                           ({**SMALL, "algorithm": "awq", "sym": True}, "sym")):
            r = srv.submit(bad)
            assert r.status_code == 422 and field in r.json()["detail"], (bad, r.text)
        r = srv.submit({**SMALL, "model": str(tmp_path / "no-such-model")})
        assert r.status_code == 400 and "not under a folder this server opens" in r.json()["detail"]
        # idempotent submission; force makes a new job
        first = srv.submit(SMALL)
        again = srv.submit({**SMALL, "priority": 5, "evaluation": {"windows": 3}})   # not part of the recipe
        forced = srv.submit(SMALL, force="true")
        assert (first.status_code, again.status_code, forced.status_code) == (201, 200, 201)
        assert first.json()["id"] == again.json()["id"] != forced.json()["id"]
        assert first.json()["revision"] and first.json()["memory_gb"] > 0
        # queued jobs cancel at once; retry puts them back
        fid = forced.json()["id"]
        assert h.post(f"/v1/jobs/{fid}/cancel", headers=auth("admin")).json()["state"] == "cancelled"
        r = h.post(f"/v1/jobs/{fid}/retry", headers=auth("alice"))
        assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["attempt"] == 2
        assert h.post(f"/v1/jobs/{fid}/retry", headers=auth("alice")).status_code == 409
        assert h.get("/v1/jobs/nope", headers=auth("reader")).status_code == 404

        # 200 distinct submissions, each sent twice at once from 32 threads: stored exactly once
        specs = [{**SMALL, "calibration": {**SMALL["calibration"], "seed": 1000 + i}} for i in range(200)]
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda s: srv.submit(s, who="bob"), specs + specs))
        assert all(r.status_code in (200, 201) for r in responses), {r.status_code for r in responses}
        ids = [r.json()["id"] for r in responses]
        assert ids[:200] == ids[200:] and len(set(ids)) == 200
        assert sorted(r.status_code for r in responses).count(201) == 200
        seen, offset = [], 0
        while True:
            page = h.get("/v1/jobs", params={"state": "queued", "limit": 64, "offset": offset},
                         headers=auth("reader")).json()
            seen += [j["id"] for j in page["jobs"]]
            offset += 64
            if offset >= page["total"]:
                break
        assert page["total"] == 202 and len(seen) == len(set(seen)) == 202 and set(ids) <= set(seen)
        assert h.get("/v1/jobs", params={"state": "bogus"}, headers=auth("reader")).status_code == 400
        assert "quantfarm_queue_depth 202.0" in h.get("/metrics", headers=auth("reader")).text
    finally:
        srv.close()


def test_queue_priorities_memory_fit_and_lease_expiry(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/q.db", lease_seconds=0.2)
    migrate(store.engine)
    low, _ = store.submit({}, "k-low", "m", "r", priority=0)
    big, _ = store.submit({}, "k-big", "m", "r", priority=9, memory_gb=100.0)
    high, _ = store.submit({}, "k-high", "m", "r", priority=5, max_attempts=2)
    assert store.claim("w1", memory_gb=40.0)["id"] == high["id"]       # big does not fit on 40 GB
    assert store.claim("w2", memory_gb=None)["id"] == big["id"]        # a CPU slot has no budget
    time.sleep(0.3)                                                      # w1 and w2 stop beating
    again = store.claim("w3", memory_gb=40.0)
    assert again["id"] == high["id"] and again["attempt"] == 2
    assert store.heartbeat(high["id"], "w1") == (False, False)         # the old owner lost it
    assert not store.finish(high["id"], "w1", "succeeded")
    time.sleep(0.3)
    store.requeue_expired()
    assert store.get(high["id"])["state"] == "failed" and "retry" in store.get(high["id"])["error"]
    assert store.get(big["id"])["state"] == "queued" and store.get(big["id"])["attempt"] == 2
    assert store.claim("w4", memory_gb=40.0)["id"] == low["id"]


def test_client_cli_against_server(tmp_path):
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0)
    env = {**os.environ, "QUANTFARM_SERVER": srv.url, "QUANTFARM_TOKEN": TOKENS["alice"]}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env,
                              timeout=120)
    try:
        r = cli("submit", "smollm2-135m", "--samples", "4", "--seq-len", "64", "--priority", "3")
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.split()[0]
        assert "queued" in r.stdout
        r = cli("jobs")
        assert job_id in r.stdout and "(1 of 1)" in r.stdout
        r = cli("status", job_id, "--json")
        assert json.loads(r.stdout)["priority"] == 3
        r = cli("cancel", job_id)
        assert r.returncode == 0 and "cancelled" in r.stdout
        # --wait follows the event stream until the job ends (here: cancelled from elsewhere) and exits 1
        waiting = subprocess.Popen([sys.executable, "-m", "service.cli", "submit", "smollm2-135m", "--samples", "4",
                                    "--seq-len", "64", "--force", "--wait"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while not (queued := srv.http.get("/v1/jobs", params={"state": "queued"}, headers=auth("reader")).json()["jobs"]):
            assert time.time() < deadline and waiting.poll() is None
            time.sleep(0.2)
        srv.http.post(f"/v1/jobs/{queued[0]['id']}/cancel", headers=auth("alice"))
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 1 and "cancelled" in out and "state: cancelled" in err, (out, err)
        r = cli("submit", "smollm2-135m", "--bits", "4", "--group-size", "0")
        assert r.returncode == 2 and "group_size" in r.stderr
        r = subprocess.run([sys.executable, "-m", "service.cli", "jobs"], capture_output=True, text=True,
                           env={**env, "QUANTFARM_TOKEN": "wrong"}, timeout=120)
        assert r.returncode == 2 and "401" in r.stderr
    finally:
        srv.close()
