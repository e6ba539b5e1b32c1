"""Publishing as a step of a job: `quantize --publish`, `quantfarm publish` to retry, and on a real server
(named targets only, a failed upload fails only that step, retry publishes without quantizing again).
The S3 API is moto's standalone server on loopback (no S3 server can be installed here)."""
import json
import socket
import uuid

import pytest

from service.cli.main import main
from service.job.publish import is_published
from tiny import save_tiny

QUICK = ["--calibration", "model", "--samples", "4", "--seq-len", "32", "--eval-text", "model", "--eval-windows", "2",
         "--group-size", "32", "--device", "cpu"]
SMALL = {"calibration": {"source": "model", "samples": 4, "seq_len": 32}, "group_size": 32,
         "evaluation": {"text": "model", "windows": 2, "window_len": 32}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture
def s3(monkeypatch):
    """A bucket-less S3 API on loopback; the environment points boto at it (as a server's would)."""
    from moto.server import ThreadedMotoServer
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3fs.S3FileSystem(skip_instance_cache=True)
    srv.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_quantize_publishes_and_retries(tiny_dir, tmp_path, monkeypatch, capsys):
    shelf = tmp_path / "shelf"
    out = tmp_path / "art"
    assert main(["quantize", tiny_dir, *QUICK, "--out", str(out), "--publish", shelf.as_uri()]) == 0
    assert "published    file://" in capsys.readouterr().out
    manifest = is_published(f"{shelf.as_uri()}/gptq-w4-g32")
    assert manifest and {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "README.md"}
    assert (shelf / "gptq-w4-g32" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # an unreachable Hub: exit 4, the artifact kept, and `quantfarm publish` publishes it later
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out2 = tmp_path / "art2"
    assert main(["quantize", tiny_dir, *QUICK, "--out", str(out2), "--publish", "hub:acme"]) == 4
    err = capsys.readouterr().err
    assert "publishing to hub:acme failed" in err and f"kept at {out2}" in err and "quantfarm publish" in err
    assert (out2 / "model.safetensors").is_file()
    assert main(["publish", str(out2), "--to", shelf.as_uri(), "--name", "second"]) == 0
    assert is_published(f"{shelf.as_uri()}/second")
    assert main(["publish", str(tmp_path), "--to", shelf.as_uri()]) == 2           # not an artifact
    assert main(["quantize", tiny_dir, *QUICK, "--out", str(tmp_path / "x"), "--publish", "ftp2://x/y"]) == 2


def test_release_publishes_each_variant_to_s3(tiny_dir, tmp_path, s3):
    bucket = f"models-{uuid.uuid4().hex[:8]}"      # moto's buckets live per process, across its servers
    s3.mkdir(bucket)
    assert main(["release", tiny_dir, "--variants", "vllm", "--out", str(tmp_path / "rel"), "--device", "cpu",
                 "--calibration", "model", "--samples", "4", "--seq-len", "32", "--eval-text", "model",
                 "--eval-windows", "2", "--publish", f"s3://{bucket}/tiny"]) == 0
    s = json.loads((tmp_path / "rel" / "release.json").read_text())
    for row in s["variants"]:
        (rec,) = row["published"]
        assert rec["url"] == f"s3://{bucket}/tiny/{row['variant']}"
        assert is_published(rec["url"]), row["variant"]
        assert s3.cat(f"{bucket}/tiny/{row['variant']}/model.safetensors") == \
            (tmp_path / "rel" / row["variant"] / "model.safetensors").read_bytes()


def test_farm_publishes_to_named_targets_only_and_retries_publishing(tiny_dir, tmp_path, s3, monkeypatch):
    from test_service import Server, auth
    shelf, late = tmp_path / "shelf", f"late-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1,
                 args=("--model-root", tiny_dir, "--publish-target", f"shelf={shelf.as_uri()}",
                       "--publish-target", f"bucket=s3://{late}/farm"))
    try:
        def submit(**kw):
            return srv.http.post("/v1/jobs", json={"model": tiny_dir, **SMALL, **kw}, headers=auth("alice"))

        # destinations a submitter names are the administrator's: no URL, no Hub org, no hub without a token
        for bad, why in ((shelf.as_uri(), "URLs are not accepted"), ("hub:evil", "not allowed here"),
                         ("hub", "no Hub token"), ("elsewhere", "use one of: local, hub, shelf, bucket")):
            r = submit(publish=[bad])
            assert r.status_code == 422 and why in r.json()["detail"], (bad, r.text)
        job = submit(publish=["local", "shelf"], name="tiny-g32").json()
        job = srv.wait(job["id"])
        assert job["state"] == "succeeded", job
        assert is_published(f"{shelf.as_uri()}/tiny-g32") and job["artifacts"][0]["published"]
        assert [p["entry"] for p in job["result"]["published"]] == ["shelf"]

        # the bucket does not exist yet: the job ends publish_failed, its artifact kept and unpublished
        job = srv.wait(submit(publish=["bucket"], bits=8).json()["id"])
        assert job["state"] == "publish_failed", job
        assert "POST /v1/jobs/" in job["error"] and "retry" in job["error"]
        assert job["result"]["publish_pending"] == ["bucket"] and not job["artifacts"][0]["published"]
        s3.mkdir(late)
        r = srv.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
        assert r.status_code == 200, r.text
        job = srv.wait(job["id"], until=lambda j: j["state"] not in ("queued", "running"))
        assert job["state"] == "succeeded", job
        assert job["artifacts"][0]["published"] and is_published(f"s3://{late}/farm/gptq-w8-g32")
        events = srv.http.get(f"/v1/jobs/{job['id']}/logs", headers=auth("reader")).text
        assert events.count("quantize") == 1            # the retry published; it did not quantize again
        # an admin may name a URL (as a batch file may)
        r = srv.http.post("/v1/jobs", json={"model": tiny_dir, **SMALL, "bits": 2, "publish": [(tmp_path / "adm").as_uri()]},
                          headers=auth("admin"))
        assert r.status_code == 201, r.text
        assert srv.wait(r.json()["id"])["state"] == "succeeded" and is_published(f"{(tmp_path / 'adm').as_uri()}/gptq-w2-g32")
        metrics = srv.http.get("/metrics", headers=auth("reader")).text
        assert 'quantfarm_jobs{state="succeeded"} 3.0' in metrics
    finally:
        srv.close()


def test_farm_storage_url_keeps_state_and_artifacts_in_s3(tiny_dir, tmp_path, s3):
    """`serve --storage s3://...`: the worker computes in a scratch folder, mirrors each layer's state to the
    bucket while it runs and the artifact when done, and keeps nothing of the job on its own disk; the API
    lists and serves the artifact's files and its report from the bucket."""
    from test_service import Server, auth
    bucket = f"farm-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    home = tmp_path / "home"
    srv = Server(home, f"sqlite:///{tmp_path}/store.db", workers=1,
                 args=("--model-root", tiny_dir, "--storage", f"s3://{bucket}/farm"))
    try:
        job_id = srv.http.post("/v1/jobs", json={"model": tiny_dir, **SMALL}, headers=auth("alice")).json()["id"]
        job = srv.wait(job_id, timeout=240)
        assert job["state"] == "succeeded", job
        assert job["result"]["artifact"] == f"s3://{bucket}/farm/artifacts/{job_id}"
        log = srv.http.get(f"/v1/jobs/{job_id}/logs", headers=auth("reader")).text
        assert "store artifact" in log
        listing = srv.http.get(job["artifacts"][0]["files"], headers=auth("reader")).json()
        names = {f["path"]: f for f in listing["files"]}
        assert {"config.json", "model.safetensors", "report.json", "README.md"} <= set(names)
        got = srv.http.get(names["model.safetensors"]["url"], headers=auth("reader"))
        assert got.status_code == 200 and got.content == s3.cat(f"{bucket}/farm/artifacts/{job_id}/model.safetensors")
        assert srv.http.get(names["config.json"]["url"].replace("config.json", "../x"),
                            headers=auth("reader")).status_code == 404
        assert srv.http.get(f"/v1/jobs/{job_id}/report", headers=auth("reader")).json()["spec"]["model"] == tiny_dir
        assert not s3.exists(f"{bucket}/farm/state/{job_id}")                   # state goes once the job is done
        assert not (home / "artifacts" / job_id).exists() and not any((home / "scratch").rglob("*.safetensors"))
    finally:
        srv.close()


def test_unusable_storage_is_refused_at_start(tmp_path, capsys):
    assert main(["serve", "--home", str(tmp_path), "--storage", "file:///proc/no-such-folder", "--port", "0"]) == 2
    assert "storage file:///proc/no-such-folder is not usable" in capsys.readouterr().err
