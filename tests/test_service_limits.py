"""Limits a farm puts on its clients (issue 36, points 4, 8, 9): request bodies counted as they arrive and
refused at the limit, tokens checked before a body is read, a strict tokens file, and per-tenant quotas.
Real `quantfarm serve` processes on loopback (API only: no job runs here)."""
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import QuantfarmError
from service.farm.api import MAX_BODY_BYTES
from service.farm.auth import Auth, ensure_tokens_file
from service.farm.store import Store
from test_service import SMALL, TOKENS, Server, _port, auth, tokens_file

BIG = 200 << 20                              # the outside test's body: 200 MiB
CAROL = "car-" + "c" * 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """The highest RSS of a process while the block runs, sampled every 5 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        recent, deadline = [], time.time() + 90
        while time.time() < deadline:            # the server's warm-up thread (model facts, ~20 s) is done:
            recent = [*recent[-4:], rss_mib(self.pid)]          # flat for 2 s
            if len(recent) == 5 and max(recent) - min(recent) < 1:
                break
            time.sleep(0.5)
        self.base = self.peak = rss_mib(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc):
        time.sleep(0.2)                           # whatever the server still does with the request
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pid))


def raw_exchange(port: int, head: str, body: bytes = b"") -> bytes:
    """Send request headers (and `body`, which need not finish the request) on a plain socket, then read
    what the server answers without sending anything more."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    home = tmp_path_factory.mktemp("limits")
    tokens = tokens_file(home, extra=[{"name": "carol", "token": CAROL, "roles": ["submit"],
                                       "limits": {"max_active_jobs": 3, "max_release_jobs": 2}}],
                         limits={"submit": {"max_priority": 5}})
    srv = Server(home, f"sqlite:///{home}/store.db", workers=0, tokens=tokens)
    yield srv
    srv.close()


# ---- request bodies --------------------------------------------------------------------------------------

def test_streamed_body_refused_at_the_limit_without_reading_it(farm):
    """200 MiB chunked (no Content-Length) from a generator, with and without a token: 413 / 401 while the
    client is still sending; the server's RSS grows by far less than the body."""
    assert farm.http.get("/v1/jobs", headers=auth("reader")).status_code == 200       # warm
    for headers, status, words in ((auth("alice"), 413, "limit of 1048576 bytes"),
                                   ({}, 401, "missing bearer token")):
        produced = 0

        def body():
            nonlocal produced
            chunk = b" " * (1 << 20)
            while produced < BIG:
                produced += len(chunk)
                yield chunk
        with PeakRss(farm.proc.pid) as mem:
            r = farm.http.post("/v1/jobs", content=body(), headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status and words in r.json()["detail"], r.text
        assert r.headers["connection"] == "close"
        growth = mem.peak - mem.base
        print(f"\n{status}: client produced {produced / 2 ** 20:.0f} of {BIG >> 20} MiB before the answer; "
              f"server RSS {mem.base:.0f} -> peak {mem.peak:.0f} MiB (+{growth:.1f})")
        assert produced < 32 << 20, produced                # the socket buffers, not the body
        assert growth < 32, (mem.base, mem.peak)
    # under the limit a chunked body reaches the app (422: the model name is too long, not 413)
    r = farm.http.post("/v1/jobs", content=iter([json.dumps({"model": "m" * (MAX_BODY_BYTES - 64_000)}).encode()]),
                       headers={**auth("alice"), "Content-Type": "application/json"})
    assert r.status_code == 422 and "model" in r.json()["detail"], r.text


def test_declared_length_and_missing_token_answered_before_the_body(farm):
    """A declared Content-Length over the limit gets 413 with no body sent; a POST without a valid token gets
    401 (a reader's token 403) after one chunk of a body that never finishes."""
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {BIG}"
    answer = raw_exchange(farm.port, head + f"\r\nAuthorization: Bearer {TOKENS['alice']}")
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"detail": "request body over' in answer, answer
    chunked = "POST /v1/releases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    one_chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    for extra, status in (("", b"401"), ("\r\nAuthorization: Bearer wrong-token-0123456789", b"401"),
                          (f"\r\nAuthorization: Bearer {TOKENS['reader']}", b"403")):
        answer = raw_exchange(farm.port, chunked + extra, one_chunk)
        assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b'"detail"' in answer, answer
        assert (b"www-authenticate: Bearer" in answer) == (status == b"401")
    for path in ("/v1/jobs/abcd/cancel", "/v1/jobs/abcd/retry"):            # every mutating route
        assert farm.http.post(path).status_code == 401, path


# ---- the tokens file -------------------------------------------------------------------------------------

def _entry(name="ci", token="t" * 24, roles=("submit",), **more) -> dict:
    return {"name": name, "token": token, "roles": list(roles), **more}


def _load(folder: Path, cfg: dict, mode: int = 0o600, allow_weak: bool = False) -> Auth:
    path = folder / "tokens.json"
    path.write_text(json.dumps(cfg))
    path.chmod(mode)
    return Auth.from_file(path, allow_weak=allow_weak)


@pytest.mark.parametrize("cfg, mode, words", [
    ({"anonymous_read": "false", "tokens": [_entry()]}, 0o600, "anonymous_read: Input should be a valid boolean"),
    ({"anonymous_reads": True, "tokens": [_entry()]}, 0o600, "anonymous_reads: Extra inputs are not permitted"),
    ({"tokens": [_entry(), _entry("ci2", rols=["admin"])]}, 0o600, "tokens[1] ('ci2'): rols: Extra inputs"),
    ({"tokens": [_entry(roles=["superuser"])]}, 0o600, "tokens[0] ('ci'): roles.0: Input should be 'read'"),
    ({"public": ["jobs"], "tokens": []}, 0o600, "public.0: Input should be 'docs' or 'metrics'"),
    ({"tokens": [_entry(limits={"max_priority": "5"})]}, 0o600, "tokens[0] ('ci'): limits.max_priority"),
    ({"tokens": [_entry("a"), _entry("b", roles=["admin"])]}, 0o600,
     "tokens[1] ('b') has the same token as tokens[0] ('a')"),
    ({"tokens": [_entry(token="short-admin")]}, 0o600, "tokens[0] ('ci'): the token has 11 characters, fewer than 16"),
    ({"tokens": [_entry()]}, 0o644, "mode 0644: group or others may read"),
])
def test_tokens_file_is_strict(tmp_path, cfg, mode, words):
    with pytest.raises(QuantfarmError) as e:
        _load(tmp_path, cfg, mode)
    assert words in str(e.value), str(e.value)
    assert "t" * 24 not in str(e.value)                 # never the token itself
    weak = "characters" in words or "mode" in words
    assert ("--allow-weak-tokens" in str(e.value)) == weak
    if weak:                                            # the operator's flag accepts these two, and only these
        assert _load(tmp_path, cfg, mode, allow_weak=True).tokens
    else:
        with pytest.raises(QuantfarmError):
            _load(tmp_path, cfg, mode, allow_weak=True)


def test_tokens_file_limits_and_the_created_file(tmp_path):
    a = _load(tmp_path, {"limits": {"submit": {"max_active_jobs": 5}, "admin": {"max_priority": 50}},
                         "tokens": [_entry("s"), _entry("t", token="u" * 24, limits={"max_priority": None}),
                                    _entry("adm", token="v" * 24, roles=["read", "admin"])]})
    by_name = {p.name: p.limits for p in a.tokens.values()}
    assert (by_name["s"].max_active_jobs, by_name["s"].max_release_jobs, by_name["s"].max_priority) == (5, 16, 10)
    assert (by_name["t"].max_active_jobs, by_name["t"].max_priority) == (5, None)
    assert (by_name["adm"].max_active_jobs, by_name["adm"].max_priority) == (None, 50)
    path = ensure_tokens_file(tmp_path / "home")               # what serve creates passes its own check
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.role for p in Auth.from_file(path).tokens.values()] == ["admin"]


def test_serve_refuses_a_weak_tokens_file_unless_allowed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "weak.json"
    path.write_text(json.dumps({"tokens": [_entry("admin", token="adm1", roles=["admin"])]}))
    path.chmod(0o644)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(_port()),
           "--workers", "0", "--tokens", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    for words in ("the token has 4 characters", "mode 0644", "--allow-weak-tokens"):
        assert words in r.stderr, r.stderr[-2000:]
    srv = Server(home, f"sqlite:///{home}/store.db", workers=0, tokens=path, args=("--allow-weak-tokens",))
    try:
        assert srv.http.get("/v1/jobs", headers={"Authorization": "Bearer adm1"}).status_code == 200
        assert "allowed by --allow-weak-tokens" in (home / "serve.log").read_text()
    finally:
        srv.close()


# ---- quotas ------------------------------------------------------------------------------------------------

def test_quotas_per_tenant(farm):
    """carol: 3 jobs queued or running, 2 per release; every submit token: priority at most 5 (the file's
    role default); admin: none of these."""
    carol = {"Authorization": f"Bearer {CAROL}"}
    spec = {**SMALL, "calibration": {**SMALL["calibration"], "seed": 36}}
    r = farm.http.post("/v1/jobs", json={**spec, "priority": 6}, headers=carol)
    assert r.status_code == 403 and "max_priority 5" in r.json()["detail"], r.text
    assert "tokens file" in r.json()["detail"]                       # how to raise it
    r = farm.submit({**spec, "priority": 6})                     # alice too: the role's limit from the file
    assert r.status_code == 403 and "max_priority 5" in r.json()["detail"], r.text

    release = {"model": "smollm2-135m", "preset": "vllm", "calibration": SMALL["calibration"]}   # 4 variants
    r = farm.http.post("/v1/releases", json=release, headers=carol)
    assert r.status_code == 403 and "makes 4 jobs" in r.json()["detail"], r.text
    assert "max_release_jobs" in r.json()["detail"]

    store = Store(f"sqlite:///{farm.home}/store.db")
    queued = [store.submit({}, f"carol-{i}", "m", "r", submitted_by="carol")[0]["id"] for i in range(3)]
    r = farm.http.post("/v1/jobs", json=spec, headers=carol)
    assert r.status_code == 429, r.text
    assert "has 3 jobs queued or running" in r.json()["detail"] and "max_active_jobs" in r.json()["detail"]
    assert farm.http.post(f"/v1/jobs/{queued[0]}/cancel", headers=carol).json()["state"] == "cancelled"
    two = {**release, "preset": None, "variants": [{"bits": 4}, {"bits": 8}]}
    r = farm.http.post("/v1/releases", json=two, headers=carol)                 # 2 active + 2 new > 3
    assert r.status_code == 429 and "would add 2" in r.json()["detail"], r.text
    r = farm.http.post("/v1/jobs", json=spec, headers=carol)                    # 2 active + 1 = 3: room
    assert r.status_code == 201, r.text
    r = farm.http.post(f"/v1/jobs/{queued[0]}/retry", headers=carol)           # a retry queues one more
    assert r.status_code == 429, r.text

    r = farm.submit({**spec, "priority": 100}, who="admin", force="true")
    assert r.status_code == 201 and r.json()["priority"] == 100, r.text
    r = farm.http.post("/v1/releases", json=release, headers=auth("admin"))
    assert r.status_code == 201 and len(r.json()["variants"]) == 4, r.text
