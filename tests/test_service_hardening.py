"""The service under untrusted submitters and bad input (issue 15): remote code and pickle, local files,
bounds on every field, tenancy, short ids, storage checks before queueing, event streams that hold no
request thread, a cold-start burst, and schemathesis against the app's OpenAPI. Real `quantfarm serve`
processes on loopback (API only: no job runs here), SQLite and PostgreSQL."""
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from service.farm.store import Store, jobs
from test_service import PG_URL, SMALL, TOKENS, Server, auth, tokens_file
from tiny import save_tiny

UNNAMED = {"u1": "unnamed-" + "1" * 20, "u2": "unnamed-" + "2" * 20}
COLD_BURST = int(os.environ.get("QUANTFARM_COLD_BURST", "300"))     # RELIABILITY.md: 1000


def unnamed(who: str) -> dict:
    return {"Authorization": f"Bearer {UNNAMED[who]}"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A model root with a tiny model (and a copy that needs custom code), a data root with a calibration
    file, and outside both a model, a text file and a link into them."""
    base = tmp_path_factory.mktemp("roots")
    models, data, outside = base / "models", base / "data", base / "outside"
    for d in (models, data, outside):
        d.mkdir()
    save_tiny(models / "tiny")
    shutil.copytree(models / "tiny", models / "custom")
    cfg = (models / "custom" / "config.json").read_text()
    (models / "custom" / "config.json").write_text(
        cfg.replace("{", '{"auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},', 1))
    shutil.copytree(models / "tiny", outside / "tiny")
    (models / "escape").symlink_to(outside / "tiny")
    (data / "calib.txt").write_text("w1 w2 w3 " * 400)
    (outside / "calib.txt").write_text("w1 w2 w3 " * 400)
    return {"models": models, "data": data, "outside": outside}


def _farm(home: Path, db: str, roots: dict) -> Server:
    tokens = tokens_file(home, extra=[{"token": UNNAMED["u1"], "roles": ["submit"]},
                                      {"token": UNNAMED["u2"], "roles": ["submit"]}])
    return Server(home, db, workers=0, tokens=tokens,
                  args=("--model-root", str(roots["models"]), "--data-root", str(roots["data"]),
                        "--allow-remote-code"))


@pytest.fixture(scope="module")
def farm(tmp_path_factory, roots):
    home = tmp_path_factory.mktemp("farm")
    srv = _farm(home, f"sqlite:///{home}/store.db", roots)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def pg_farm(tmp_path_factory, roots):
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {e}")
    name = f"qf_test_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE DATABASE {name}")
    home = tmp_path_factory.mktemp("pg-farm")
    srv = _farm(home, PG_URL.rsplit("/", 1)[0] + f"/{name}", roots)
    yield srv
    srv.close()
    conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    conn.execute(f"DROP DATABASE IF EXISTS {name}")
    conn.close()


def _fake_artifact(srv: Server, db: str, folder: Path, result: dict | None = None) -> tuple[str, str]:
    """A finished job with an artifact folder, straight through the store (no worker runs here)."""
    store = Store(db)
    job, _ = store.submit({**SMALL, "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 128},
                          uuid.uuid4().hex, "smollm2-135m", "rev", submitted_by="alice", priority=100)
    assert store.claim("test-worker")["id"] == job["id"]
    store.finish(job["id"], "test-worker", "succeeded", result=result,
                 artifact={"path": str(folder), "format": "gptq", "size_bytes": 1, "published": True})
    art = store.artifacts_of(job["id"])[0]
    return job["id"], art["id"]


# ---- remote code, pickle, local files -----------------------------------------------------------------

def test_remote_code_and_pickle_are_the_servers_decision(farm, roots, tmp_path):
    custom = str(roots["models"] / "custom")
    r = farm.submit({**SMALL, "trust_remote_code": True})                    # the server allows it for admins
    assert r.status_code == 403 and "admin token" in r.json()["detail"], r.text
    r = farm.submit({**SMALL, "model": custom, "trust_remote_code": True})
    assert r.status_code == 403 and "admin token" in r.json()["detail"], r.text
    for who in ("alice", "admin"):                                            # and not pickle for anyone
        r = farm.submit({**SMALL, "allow_pickle": True}, who=who)
        assert r.status_code == 403 and "--allow-pickle" in r.json()["detail"], r.text
    r = farm.submit({**SMALL, "model": custom})                               # auto_map without trust
    assert r.status_code == 403 and "trust_remote_code" in r.json()["detail"], r.text
    r = farm.submit({**SMALL, "model": custom, "trust_remote_code": True}, who="admin")
    assert r.status_code == 201, r.text

    # a worker without --allow-remote-code refuses such a job even if it is in the queue
    from service.farm.policy import Policy
    from service.farm.worker import run_job
    store = Store(f"sqlite:///{tmp_path}/w.db")
    from service.farm.store import migrate
    migrate(store.engine)
    job, _ = store.submit({**SMALL, "model": custom, "trust_remote_code": True}, "k", custom, "r")
    claimed = store.claim("w")
    assert run_job(store, claimed, "w", tmp_path, "cpu", Policy()) == "failed"
    assert "trust_remote_code is off" in store.get(job["id"])["error"]
    assert not (tmp_path / "artifacts").exists()


def test_local_files_only_under_roots_with_one_answer(farm, roots):
    outside = roots["outside"]

    def detail(spec, who="alice", status=400):
        r = farm.submit(spec, who=who)
        assert r.status_code == status, (spec, r.text)
        return r.json()["detail"]

    # models: whatever exists outside the roots (a model, a file, nothing, a link out, ../), one answer
    answers = set()
    for ref in (str(outside / "tiny"), "/etc/passwd", "/etc", str(outside / "missing"), str(outside / "x.gguf"),
                str(roots["models"] / "escape"), str(roots["models"] / ".." / "outside" / "tiny"), "./tiny"):
        answers.add(detail({**SMALL, "model": ref}, who="admin").replace(repr(ref), "REF"))
    assert len(answers) == 1 and "--model-root" in answers.pop()
    r = farm.submit({**SMALL, "model": str(roots["models"] / "tiny"), "group_size": 32})
    assert r.status_code == 201, r.text

    # calibration and evaluation files, task data folders: the same
    answers = set()
    for src in (str(outside / "calib.txt"), str(outside / "missing.txt"), "/etc/passwd", "file:/etc/hostname",
                "../outside/calib.jsonl"):
        answer = detail({**SMALL, "calibration": {**SMALL["calibration"], "source": src}})
        answers.add(answer.replace(repr(src.removeprefix("file:")), "REF"))
    assert len(answers) == 1 and "--data-root" in answers.pop(), answers
    assert "--data-root" in detail({**SMALL, "evaluation": {"text": str(outside / "calib.txt")}})
    assert "--data-root" in detail({**SMALL, "evaluation": {"data_dir": "/etc"}})
    inside = str(roots["data"] / "calib.txt")
    assert farm.submit({**SMALL, "calibration": {**SMALL["calibration"], "source": inside}}).status_code == 201
    assert "does not exist" in detail({**SMALL, "calibration": {**SMALL["calibration"],
                                                                 "source": str(roots["data"] / "nope.txt")}})


# ---- bounds: same answers on SQLite and PostgreSQL ------------------------------------------------------

def _probes(srv: Server, artifact_id: str, job_id: str) -> list[tuple[str, int]]:
    h = srv.http
    spec = {**SMALL, "calibration": {**SMALL["calibration"]}}
    cal = spec["calibration"]
    bodies = {
        "model NUL": {**spec, "model": "smollm2\x00-135m"},
        "model 301": {**spec, "model": "m" * 301},
        "model 300 path": {**spec, "model": "/" + "m" * 299},
        "revision 300": {**spec, "revision": "r" * 300},
        "revision 20MB": {**spec, "revision": "r" * 20_000_000},
        "suite 2M": {**spec, "evaluation": {"suite": ["perplexity"] * 2_000_000}},
        "suite 33": {**spec, "evaluation": {"suite": ["perplexity"] * 33}},
        "seed 1e30": {**spec, "calibration": {**cal, "seed": 10 ** 30}},
        "seed -1": {**spec, "calibration": {**cal, "seed": -1}},
        "group 1e30": {**spec, "group_size": 10 ** 30},
        "group wider than inputs": {**spec, "group_size": 4096},
        "windows 1e12": {**spec, "evaluation": {"windows": 10 ** 12}},
        "publish list": {**spec, "publish": ["local"] * 1000},
        "source 2000": {**spec, "calibration": {**cal, "source": "x" * 2000}},
        "awq g128 on 576": {**spec, "algorithm": "awq", "format": "awq"},
    }
    out = [(name, h.post("/v1/jobs", json=body, headers=auth("alice")).status_code) for name, body in bodies.items()]
    gets = {
        "offset 2^64": ("/v1/jobs", {"offset": 2 ** 64}),
        "limit 1e30": ("/v1/jobs", {"limit": 10 ** 30}),
        "state NUL": ("/v1/jobs", {"state": "que\x00ued"}),
        "model NUL query": ("/v1/jobs", {"model": "a\x00b"}),
        "model 301 query": ("/v1/jobs", {"model": "m" * 301}),
        "job id NUL": (f"/v1/jobs/{job_id[:8]}%00", None),
        "job id 300": ("/v1/jobs/" + "a" * 300, None),
        "job id short": ("/v1/jobs/abc", None),
        "events after 1e30": (f"/v1/jobs/{job_id}/events", {"after": 10 ** 30}),
        "artifact NUL": (f"/v1/artifacts/{artifact_id}/files/a%00b", None),
        "artifact 300": (f"/v1/artifacts/{artifact_id}/files/" + "n" * 300, None),
        "artifact 3000 segments": (f"/v1/artifacts/{artifact_id}/files/" + "/".join(["a"] * 3000), None),
        "artifact loop": (f"/v1/artifacts/{artifact_id}/files/loop", None),
        "artifact loop/x": (f"/v1/artifacts/{artifact_id}/files/loop/x", None),
        "artifact link out": (f"/v1/artifacts/{artifact_id}/files/out", None),
        "artifact ..": (f"/v1/artifacts/{artifact_id}/files/..%2F..%2Fetc%2Fpasswd", None),
    }
    out += [(name, h.get(url, params=params, headers=auth("reader")).status_code)
            for name, (url, params) in gets.items()]
    for name, value in (("Last-Event-ID abc", "abc"), ("Last-Event-ID 1e30", str(10 ** 30))):
        out.append((name, h.get(f"/v1/jobs/{job_id}/events", headers={**auth("reader"), "Last-Event-ID": value})
                    .status_code))
    out.append(("non-ASCII token", h.get("/v1/jobs", headers={"Authorization": "Bearer é€😀".encode()}).status_code))
    out.append(("latin-1 token", h.get("/v1/jobs", headers={"Authorization": b"Bearer \xff\xfe"}).status_code))
    return out


def test_bounds_same_answers_on_sqlite_and_postgresql(farm, pg_farm, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "out").symlink_to("/etc/passwd")
    answers = {}
    for name, srv, db in (("sqlite", farm, f"sqlite:///{farm.home}/store.db"), ("postgresql", pg_farm, None)):
        db = db or next(a for a in srv.proc.args if a.startswith("postgresql"))
        job_id, artifact_id = _fake_artifact(srv, db, folder)
        answers[name] = _probes(srv, artifact_id, job_id)
        listing = srv.http.get(f"/v1/artifacts/{artifact_id[:6]}", headers=auth("reader"))
        assert listing.status_code == 200 and [f["path"] for f in listing.json()["files"]] == ["config.json"]
    assert answers["sqlite"] == answers["postgresql"]
    codes = dict(answers["sqlite"])
    assert all(c < 500 for c in codes.values()), codes
    expected = {"model NUL": 422, "model 301": 422, "model 300 path": 400, "revision 300": 422, "revision 20MB": 413,
                "suite 2M": 413, "suite 33": 422, "seed 1e30": 422, "seed -1": 422, "group 1e30": 422,
                "group wider than inputs": 422, "windows 1e12": 422, "publish list": 422, "source 2000": 422,
                "awq g128 on 576": 422, "offset 2^64": 422, "limit 1e30": 422, "state NUL": 400,
                "model NUL query": 400, "model 301 query": 422, "job id NUL": 404, "job id 300": 404,
                "job id short": 400, "events after 1e30": 422, "artifact NUL": 404, "artifact 300": 404,
                "artifact 3000 segments": 404, "artifact loop": 404, "artifact loop/x": 404, "artifact link out": 404,
                "artifact ..": 404, "Last-Event-ID abc": 400, "Last-Event-ID 1e30": 400, "non-ASCII token": 401,
                "latin-1 token": 401}
    assert codes == expected


def test_memory_estimate_within_the_largest_worker(farm, tmp_path):
    """A CPU slot has a budget too (host memory): the API refuses what no worker can hold, and a CPU
    worker does not claim it. Workers elsewhere (`quantfarm worker`) count through the store."""
    from service.farm import admission
    from core.errors import SpecError
    from service.farm.policy import Policy
    from service.farm.supervisor import largest_worker_gb
    from service.job.spec import JobSpec
    from service.farm.store import migrate
    from service.farm.worker import device_memory_gb, host_memory_gb
    host = host_memory_gb()
    assert largest_worker_gb(1) == device_memory_gb("cpu") == host > 1 and largest_worker_gb(0) is None
    huge = JobSpec.model_validate({**SMALL, "calibration": {"samples": 100_000, "seq_len": 131_072}})
    with pytest.raises(SpecError, match="largest worker has"):
        admission.admit(huge, admin=True, policy=Policy(), artifact_root=tmp_path, worker_memory_gb=host)
    ok = admission.admit(JobSpec.model_validate(SMALL), admin=False, policy=Policy(), artifact_root=tmp_path,
                         worker_memory_gb=host)
    assert 0 < ok.memory_gb < host
    store = Store(f"sqlite:///{tmp_path}/q.db")
    migrate(store.engine)
    store.submit({}, "k-huge", "m", "r", memory_gb=93_751.0)
    assert store.claim("cpu-worker", device_memory_gb("cpu")) is None

    farm_store = Store(f"sqlite:///{farm.home}/store.db")
    farm_store.worker_seen("gpu-box:1:cuda", "cuda", 0.5)        # an API-only server with one small remote worker
    try:
        spec = {**SMALL, "calibration": {**SMALL["calibration"], "seed": 123}}
        r = farm.submit(spec)
        assert r.status_code == 422 and "largest worker has 0.5 GB" in r.json()["detail"], r.text
    finally:
        farm_store.worker_gone("gpu-box:1:cuda")
    assert farm.submit(spec).status_code == 201


# ---- tenancy, short ids, docs and metrics ---------------------------------------------------------------

def test_tenancy_resubmission_and_private_store(farm):
    spec = {**SMALL, "calibration": {**SMALL["calibration"], "seed": 4242}}
    a = farm.http.post("/v1/jobs", json=spec, headers=unnamed("u1")).json()
    b = farm.http.post("/v1/jobs", json={**spec, "priority": 1}, params={"force": "true"}, headers=unnamed("u2")).json()
    assert a["submitted_by"].startswith("unnamed-") and b["submitted_by"].startswith("unnamed-")
    assert a["submitted_by"] != b["submitted_by"]
    r = farm.http.post(f"/v1/jobs/{a['id']}/cancel", headers=unnamed("u2"))
    assert r.status_code == 403, r.text
    assert farm.http.post(f"/v1/jobs/{a['id']}/cancel", headers=unnamed("u1")).json()["state"] == "cancelled"
    again = farm.http.post("/v1/jobs", json=spec, headers=unnamed("u1"))           # a cancelled recipe: a new job
    assert again.status_code == 201 and again.json()["id"] != a["id"], again.text
    same = farm.http.post("/v1/jobs", json=spec, headers=unnamed("u1"))
    assert same.status_code == 200 and same.json()["id"] == again.json()["id"]
    assert farm.job(a["id"])["state"] == "cancelled"

    for path in ("/metrics", "/v1/metrics", "/openapi.json"):
        assert farm.http.get(path).status_code == 401, path
        assert farm.http.get(path, headers=auth("reader")).status_code == 200, path
    assert farm.http.get("/docs").status_code == 200          # the page holds no data; it asks for a token
    page = farm.http.get("/docs", headers=auth("reader")).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for a in assets:
        assert farm.http.get(a).status_code == 200, a

    modes = {p.name: p.stat().st_mode & 0o777 for p in farm.home.glob("store.db*")}
    assert modes and set(modes.values()) == {0o600}, modes


def test_public_docs_and_metrics_from_the_tokens_file(tmp_path):
    from fastapi.testclient import TestClient

    from service.farm.api import FarmSettings, create_app
    from service.farm.auth import Auth
    from service.farm.store import migrate
    db = f"sqlite:///{tmp_path}/s.db"
    migrate(Store(db).engine)
    path = tokens_file(tmp_path, public=["docs", "metrics"])
    with TestClient(create_app(FarmSettings(db, tmp_path, Auth.from_file(path)))) as c:
        assert c.get("/docs").status_code == c.get("/openapi.json").status_code == c.get("/metrics").status_code == 200
        assert c.get("/v1/jobs").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_short_ids(farm):
    db = f"sqlite:///{farm.home}/store.db"
    store = Store(db)
    row = dict(recipe_key="r", model="m", revision="x", spec=SMALL, state="cancelled", layers_done=0, priority=0,
               memory_gb=0.0, attempt=1, max_attempts=3, cancel_requested=False, submitted_by="alice",
               created_at=time.time())
    with store.engine.begin() as c:
        for suffix in ("0" * 28, "1" * 28):
            c.execute(insert(jobs).values(id="abcd" + suffix, dedup_key=f"r:abcd{suffix}", **row))
    r = farm.http.get("/v1/jobs/abcd", headers=auth("reader"))
    assert r.status_code == 400 and "matches several" in r.json()["detail"], r.text
    assert farm.job("abcd1")["id"] == "abcd" + "1" * 28
    assert farm.http.get("/v1/jobs/abcd2", headers=auth("reader")).status_code == 404
    job = farm.submit({**SMALL, "calibration": {**SMALL["calibration"], "seed": 777}}).json()
    short = job["id"][:8]
    assert "queued" in farm.http.get(f"/v1/jobs/{short}/logs", headers=auth("reader")).text
    assert farm.http.post(f"/v1/jobs/{short}/cancel", headers=auth("alice")).json()["state"] == "cancelled"
    assert farm.http.post(f"/v1/jobs/{short}/retry", headers=auth("alice")).json()["attempt"] == 2


# ---- storage before queueing, health -------------------------------------------------------------------

def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_storage_checked_before_queueing(farm):
    """A full or read-only artifact disk: 507 at submission naming path and numbers, /healthz degraded."""
    arts = farm.home / "artifacts"
    arts.mkdir(exist_ok=True)
    spec = {**SMALL, "calibration": {**SMALL["calibration"], "seed": 31337}}
    if not _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(arts)]):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        r = farm.submit(spec)
        assert r.status_code == 507 and "not enough space" in r.json()["detail"] and "MiB" in r.json()["detail"]
        h = farm.http.get("/healthz")
        assert h.status_code == 503 and not h.json()["ok"] and str(arts) in " ".join(h.json()["problems"])
        assert _mount(["-o", "remount,ro,size=512m", str(arts)])
        r = farm.submit(spec)
        assert r.status_code == 507 and "cannot write" in r.json()["detail"], r.text
        assert farm.http.get("/healthz").status_code == 503
    finally:
        subprocess.run(["umount", str(arts)], check=True)
    assert farm.http.get("/healthz").status_code == 200
    assert farm.submit(spec).status_code == 201


# ---- event streams, cold start, fuzzing ---------------------------------------------------------------

def test_event_streams_hold_no_request_thread(farm):
    """200 open /events streams; /healthz p99 stays under 200 ms."""
    job_id = farm.submit({**SMALL, "calibration": {**SMALL["calibration"], "seed": 9001}}).json()["id"]
    n = 200

    async def main():
        opened, release = asyncio.Semaphore(0), asyncio.Event()
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=farm.url, limits=limits, timeout=60) as client:
            async def follow():
                async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth("reader")) as r:
                    lines = r.aiter_lines()
                    while not (await lines.__anext__()).startswith("event: state"):
                        pass
                    opened.release()
                    await release.wait()
            tasks = [asyncio.create_task(follow()) for _ in range(n)]
            for _ in range(n):
                await asyncio.wait_for(opened.acquire(), 60)
            latencies = await asyncio.to_thread(_healthz_latencies, farm.url, 200)
            release.set()
            await asyncio.gather(*tasks)
            return latencies
    lat = sorted(asyncio.run(main()))
    p99 = lat[int(0.99 * len(lat)) - 1]
    print(f"\n{n} open streams: /healthz median {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.2, lat[-5:]
    assert farm.job(job_id)["state"] == "queued"


def _healthz_latencies(url: str, k: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(k):
            t = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            out.append(time.perf_counter() - t)
    return out


def test_cold_start_burst_loses_nothing(tmp_path):
    """Right after its first /healthz, a fresh server takes COLD_BURST submissions (each recipe twice) from
    32 threads: no 5xx, no connection error, every recipe stored exactly once."""
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=0)
    try:
        distinct = COLD_BURST // 2
        specs = [{**SMALL, "calibration": {**SMALL["calibration"], "seed": 50_000 + i}} for i in range(distinct)]

        def send(spec):
            try:
                return srv.submit(spec, who="bob")
            except httpx.HTTPError as e:
                return e
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(send, specs + specs))
        seconds = time.perf_counter() - t
        failed = [r for r in responses if isinstance(r, Exception) or r.status_code not in (200, 201)]
        assert not failed, failed[:3]
        ids = [r.json()["id"] for r in responses]
        assert ids[:distinct] == ids[distinct:] and len(set(ids)) == distinct
        rows, total = Store(f"sqlite:///{tmp_path}/store.db").list_jobs(limit=1)
        assert total == distinct
        print(f"\ncold burst: {len(responses)} submissions from 32 threads in {seconds:.1f} s, 0 lost, 0 5xx")
    finally:
        srv.close()


def test_schemathesis_finds_no_server_error(farm, tmp_path):
    """Property-based requests from the app's own OpenAPI, with an admin token and a 60 s budget: no 5xx,
    status codes, content types, headers and bodies as documented."""
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "response_headers_conformance")
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{farm.url}/openapi.json",
           "-H", f"Authorization: Bearer {TOKENS['admin']}", "--checks", checks, "--max-examples", "20",
           "--max-time", "60", "--seed", "1", "--workers", "1", "--request-timeout", "30"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_COLOR": "1"})
    cases = re.search(r"(\d+) generated", r.stdout)
    print(f"\nschemathesis: {cases.group(0) if cases else '?'} cases, exit {r.returncode}")
    assert r.returncode == 0, r.stdout[-6000:]
    assert cases and int(cases.group(1)) >= 100
