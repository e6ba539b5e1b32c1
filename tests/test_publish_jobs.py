"""Publishing as a step of a job: `quantize --publish`, `quantfarm publish` to retry, and on a real server
(named targets only, a failed upload fails only that step, retry publishes without quantizing again).
The S3 API is moto's standalone server on loopback (no S3 server can be installed here)."""
import json
import socket
import uuid
from pathlib import Path

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


def published_url(shelf_url: str, artifact, name: str) -> str:
    """Where an artifact of the folder named llama goes under a target: MODEL-REV/NAME, REV from its report."""
    rev = json.loads((Path(artifact) / "report.json").read_text())["revision"]
    return f"{shelf_url}/llama-{rev[:12]}/{name}"


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
    url = published_url(shelf.as_uri(), out, "gptq-w4-g32")
    assert f"published    {shelf.as_uri()}: {url}\n" in capsys.readouterr().out
    manifest = is_published(url)
    assert manifest and {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "README.md"}
    assert manifest["source"] == tiny_dir and manifest["recipe_key"] == json.loads((out / "report.json").read_text())["recipe_key"]
    folder = shelf / manifest["path"]
    assert folder.as_uri() == url and (folder / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert main(["publish", str(out), "--to", shelf.as_uri()]) == 0                   # the same files: a no-op
    assert "(already there, the same files: nothing copied)" in capsys.readouterr().out
    # another recipe of the same model under the same name: refused, the published folder untouched; --replace
    out8 = tmp_path / "art8"
    assert main(["quantize", tiny_dir, *QUICK, "--bits", "8", "--out", str(out8)]) == 0
    capsys.readouterr()
    assert main(["publish", str(out8), "--to", shelf.as_uri(), "--name", "gptq-w4-g32"]) == 4
    err = capsys.readouterr().err
    assert "holds another artifact" in err and "--replace" in err and f"kept at {out8}" in err
    assert (folder / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes() and is_published(url)
    assert main(["publish", str(out8), "--to", shelf.as_uri(), "--name", "gptq-w4-g32", "--replace"]) == 0
    assert "(replaced what was there)" in capsys.readouterr().out
    assert (folder / "model.safetensors").read_bytes() == (out8 / "model.safetensors").read_bytes()
    assert is_published(url)["recipe_key"] == json.loads((out8 / "report.json").read_text())["recipe_key"]
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
    assert is_published(published_url(shelf.as_uri(), out2, "second"))
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
        assert rec["url"] == f"s3://{bucket}/tiny/llama-{s['revision'][:12]}/{row['variant']}"
        assert is_published(rec["url"]), row["variant"]
        assert s3.cat(f"{rec['url'][5:]}/model.safetensors") == \
            (tmp_path / "rel" / row["variant"] / "model.safetensors").read_bytes()


def test_farm_publishes_to_named_targets_only_and_retries_publishing(tiny_dir, tmp_path, s3, monkeypatch):
    from test_service import Server, auth
    shelf, late = tmp_path / "shelf", f"late-{uuid.uuid4().hex[:8]}"
    other = str(save_tiny(tmp_path / "bob" / "llama", seed=1))      # bob's model: another one, also named llama
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ("--model-root", tiny_dir, "--model-root", other, "--publish-target", f"shelf={shelf.as_uri()}",
            "--publish-target", f"bucket=s3://{late}/farm")
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1, args=args)
    try:
        def submit(who="alice", model=tiny_dir, **kw):
            return srv.http.post("/v1/jobs", json={"model": model, **SMALL, **kw}, headers=auth(who))

        # destinations a submitter names are the administrator's: no URL, no Hub org, no hub without a token
        for bad, why in ((shelf.as_uri(), "URLs are not accepted"), ("hub:evil", "not allowed here"),
                         ("hub", "no Hub token"), ("elsewhere", "use one of: local, hub, shelf, bucket")):
            r = submit(publish=[bad])
            assert r.status_code == 422 and why in r.json()["detail"], (bad, r.text)
        job = submit(publish=["local", "shelf"], name="tiny-g32").json()
        job = srv.wait(job["id"])
        assert job["state"] == "succeeded", job
        assert job["artifacts"][0]["published"] and [p["entry"] for p in job["result"]["published"]] == ["shelf"]
        first = job
        # two tenants, two models, the same settings and name, one target: two folders, both whole
        bobs = srv.wait(submit("bob", other, publish=["shelf"], name="tiny-g32").json()["id"])
        assert bobs["state"] == "succeeded", bobs
        for j, model in ((job, tiny_dir), (bobs, other)):
            (rec,) = j["result"]["published"]
            assert rec["url"] == f"{shelf.as_uri()}/llama-{j['result']['revision'][:12]}/tiny-g32"
            manifest = is_published(rec["url"])
            assert (manifest["source"], manifest["revision"], manifest["recipe_key"]) == \
                (model, j["result"]["revision"], j["result"]["recipe_key"])
            art = Path(j["result"]["artifact"])
            assert all((shelf / manifest["path"] / e["path"]).read_bytes() == (art / e["path"]).read_bytes()
                       for e in manifest["files"])
        assert job["result"]["published"][0]["url"] != bobs["result"]["published"][0]["url"]
        # another recipe under a name taken by one of alice's: refused (the job keeps its artifact), the folder kept
        clash = srv.wait(submit(publish=["shelf"], name="tiny-g32", group_size=64).json()["id"])
        assert clash["state"] == "publish_failed" and "holds another artifact" in clash["error"], clash
        assert "--publish-replace" in clash["error"] and clash["result"]["publish_pending"] == ["shelf"]
        assert is_published(first["result"]["published"][0]["url"])["recipe_key"] == first["result"]["recipe_key"]

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
        assert job["result"]["published"][0]["url"] == f"s3://{late}/farm/llama-{job['result']['revision'][:12]}/gptq-w8-g32"
        assert job["artifacts"][0]["published"] and is_published(job["result"]["published"][0]["url"])
        events = srv.http.get(f"/v1/jobs/{job['id']}/logs", headers=auth("reader")).text
        assert events.count("quantize") == 1            # the retry published; it did not quantize again
        # an admin may name a URL (as a batch file may)
        r = srv.http.post("/v1/jobs", json={"model": tiny_dir, **SMALL, "bits": 2, "publish": [(tmp_path / "adm").as_uri()]},
                          headers=auth("admin"))
        assert r.status_code == 201, r.text
        adm = srv.wait(r.json()["id"])
        assert adm["state"] == "succeeded" and is_published(f"{(tmp_path / 'adm').as_uri()}/llama-{adm['result']['revision'][:12]}/gptq-w2-g32")
        metrics = srv.http.get("/metrics", headers=auth("reader")).text
        assert 'quantfarm_jobs{state="succeeded"} 4.0' in metrics
        # the operator allows replacing (a server setting, not the submitter's): the retry publishes over it
        srv.close()
        srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1, args=(*args, "--publish-replace"))
        assert srv.http.post(f"/v1/jobs/{clash['id']}/retry", headers=auth("alice")).status_code == 200
        clash = srv.wait(clash["id"], until=lambda j: j["state"] not in ("queued", "running"))
        assert clash["state"] == "succeeded", clash
        (rec,) = clash["result"]["published"]
        assert rec["url"] == first["result"]["published"][0]["url"] and rec["status"] == "replaced"
        assert is_published(rec["url"])["recipe_key"] == clash["result"]["recipe_key"]
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
