"""The client commands against a real server (issue 16, farm parts): the token found from --home or a
message saying where to put it, short ids, retry/logs/download, recovery as a percentage, --help with
defaults, and `submit` refused at once when the format cannot hold the settings."""
import os
import subprocess
import sys
import uuid

import pytest

from service.farm.store import Store
from test_service import SMALL, Server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server that made its own tokens.json (as a new user's would), and an environment whose
    QUANTFARM_HOME is elsewhere, with no QUANTFARM_TOKEN."""
    base = tmp_path_factory.mktemp("client")
    srv = Server(base / "server-home", f"sqlite:///{base}/store.db", workers=0, own_tokens=True)
    env = {k: v for k, v in os.environ.items() if k != "QUANTFARM_TOKEN"}
    env.update(QUANTFARM_SERVER=srv.url, QUANTFARM_HOME=str(base / "elsewhere"))
    yield srv, env, f"sqlite:///{base}/store.db"
    srv.close()


def cli(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def test_token_from_home_or_where_to_put_it(served):
    srv, env, _ = served
    r = cli(env, "jobs")
    assert r.returncode == 2 and "401" in r.stderr, r.stderr
    assert "--home" in r.stderr and "tokens.json" in r.stderr and "--token" in r.stderr, r.stderr
    r = cli(env, "jobs", "--home", str(srv.home))
    assert r.returncode == 0 and "(0 of 0)" in r.stdout, r.stderr
    r = cli({**env, "QUANTFARM_TOKEN": "wrong"}, "jobs")
    assert r.returncode == 2 and "QUANTFARM_TOKEN was refused" in r.stderr, r.stderr


def test_submit_runs_the_format_preflight_before_queueing(served):
    srv, env, _ = served
    r = cli(env, "submit", "smollm2-135m", "--algorithm", "awq", "--format", "awq", "--group-size", "128",
            "--home", str(srv.home))
    assert r.returncode == 2 and "422" in r.stderr and "multiple of the group size" in r.stderr, r.stderr
    assert "(0 of 0)" in cli(env, "jobs", "--home", str(srv.home)).stdout


def test_short_ids_retry_logs_download_and_percent_recovery(served, tmp_path):
    srv, env, db = served
    env = {**env, "QUANTFARM_HOME": str(srv.home)}
    r = cli(env, "submit", "smollm2-135m", "--samples", "4", "--seq-len", "64", "--seed", "5")
    assert r.returncode == 0, r.stderr
    short = r.stdout.split()[0][:8]
    assert cli(env, "cancel", short).returncode == 0
    r = cli(env, "retry", short)
    assert r.returncode == 0 and "queued" in r.stdout, r.stderr
    r = cli(env, "logs", short)
    assert r.returncode == 0 and "cancelled" in r.stdout and "retry" in r.stdout, r.stdout

    # a finished job with an artifact, straight through the store (no worker runs here)
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "sub" / "notes.txt").write_text("hello")
    store = Store(db)
    job, _ = store.submit({**SMALL, "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 128},
                          uuid.uuid4().hex, "smollm2-135m", "rev", priority=100, submitted_by="local-admin")
    store.claim("test-worker")
    store.finish(job["id"], "test-worker", "succeeded",
                 result={"recovery": 0.7679, "recovery_basis": "perplexity"},
                 artifact={"path": str(folder), "format": "gptq", "size_bytes": 4096, "published": True})
    r = cli(env, "status", job["id"][:6])
    assert r.returncode == 0 and "recovery     76.8% (perplexity)" in r.stdout, r.stdout
    out = tmp_path / "downloaded"
    r = cli(env, "download", job["id"][:6], "--out", str(out))
    assert r.returncode == 0 and "3 files" in r.stdout, r.stderr
    for name in ("config.json", "model.safetensors", "sub/notes.txt"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    r = cli(env, "download", job["id"][:6], "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli(env, "status", "ffff0000")
    assert r.returncode == 2 and "404" in r.stderr


def test_help_shows_defaults():
    env = dict(os.environ, COLUMNS="200")
    serve = cli(env, "serve", "--help").stdout
    assert "(default: 8600)" in serve and "TCP port" in serve and "address to listen on" in serve
    assert "--allow-remote-code" in serve and "--model-root" in serve and "--data-root" in serve
    submit = cli(env, "submit", "--help").stdout
    assert "(default: 128)" in submit and "--home" in submit
    jobs = cli(env, "jobs", "--help").stdout
    assert "--count" in jobs and "(default: 20)" in jobs and "--limit" not in jobs
    for command in ("retry", "logs", "download"):
        assert "prefix" in cli(env, command, "--help").stdout
