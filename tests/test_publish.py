"""Publishing a finished artifact (service/job/publish.py) to file://, to S3 (moto's server on loopback), and to an
unreachable or refusing Hub. The artifacts are tiny fake folders: these tests are about copying, not quantizing."""
import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from core.errors import ArtifactError, PublishError, SpecError
from service.job.publish import MANIFEST, HubSettings, Target, hub_repo_id, is_published, parse_target, publish


def make_artifact(root, name="art", weights=b"\x01\x02" * 3000):
    folder = root / name
    folder.mkdir()
    qc = {"quant_method": "gptq", "bits": 4, "meta": {"quantizer": ["quantfarm:0.1.0"], "source_model": "org/Tiny-LM"}}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    (folder / "report.json").write_text(json.dumps({"recipe_key": "abc123", "spec": {"model": "HuggingFaceTB/SmolLM2 135M"}}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("# model card\n")
    (folder / "report.html").write_text("<html></html>")
    return folder


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def local_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------- file://

def test_publish_to_file_url_round_trip(tmp_path):
    art = make_artifact(tmp_path)
    dest = tmp_path / "served"
    rec = publish(art, parse_target(f"file://{dest}", allow_urls=True), name="tiny-gptq-w4")
    out = dest / "tiny-gptq-w4"
    assert rec["url"] == out.as_uri() and rec["commit"] is None
    assert rec["files"] == 6 and rec["bytes"] == sum(len(b) for b in local_files(art).values())
    got = local_files(out)
    manifest = json.loads(got.pop(MANIFEST))
    assert got == local_files(art)                       # byte for byte, nothing else besides the manifest
    assert manifest["recipe_key"] == "abc123"
    assert {e["path"]: e["size"] for e in manifest["files"]} == {k: len(v) for k, v in got.items()}
    assert is_published(rec["url"]) == manifest

    (out / "model.safetensors").write_bytes(b"truncated")  # a listed file with another size: not published
    assert is_published(rec["url"]) is None
    assert is_published((tmp_path / "nowhere").as_uri()) is None


def test_republish_replaces_manifest_and_drops_old_shards(tmp_path):
    art = make_artifact(tmp_path)
    (art / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    url = f"file://{tmp_path / 'served'}"
    publish(art, url, name="v")
    (art / "model-00002-of-00002.safetensors").unlink()
    (art / "model.safetensors").write_bytes(b"new weights")
    publish(art, url, name="v")
    out = tmp_path / "served" / "v"
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert is_published(out.as_uri())


def test_interrupted_upload_leaves_no_manifest_and_retry_completes(tmp_path, monkeypatch):
    art = make_artifact(tmp_path)
    url = f"file://{tmp_path / 'served'}"
    publish(art, url, name="v")                           # an earlier, complete publish under the same name
    (art / "tokenizer.json").write_text('{"version": "2.0"}')
    before = snapshot(art)

    real_put, calls = LocalFileSystem.put_file, []

    def failing_put(self, lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) > 2:
            raise ConnectionResetError("connection reset by peer")
        return real_put(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", failing_put)
    with pytest.raises(PublishError) as err:
        publish(art, url, name="v")
    msg = str(err.value)
    assert "after 2 of 6 files" in msg and "intact" in msg and "again" in msg and str(art) in msg
    out = tmp_path / "served" / "v"
    assert not (out / MANIFEST).exists()                  # the old manifest went first, no new one was written
    assert is_published(out.as_uri()) is None
    assert snapshot(art) == before                         # the local artifact is untouched

    monkeypatch.setattr(LocalFileSystem, "put_file", real_put)
    rec = publish(art, url, name="v")
    assert is_published(rec["url"])
    got = local_files(out)
    got.pop(MANIFEST)
    assert got == local_files(art)


def test_refuses_what_is_not_an_artifact(tmp_path):
    url = f"file://{tmp_path / 'served'}"
    with pytest.raises(ArtifactError, match="no such folder"):
        publish(tmp_path / "missing", url, name="v")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a quantfarm artifact"):
        publish(tmp_path / "plain", url, name="v")
    art = make_artifact(tmp_path)
    with pytest.raises(SpecError, match="publish name"):
        publish(art, url, name="../escape")
    assert not (tmp_path / "served").exists()


def test_local_target_copies_nothing(tmp_path):
    art = make_artifact(tmp_path)
    rec = publish(art, parse_target("local", allow_urls=False), name="v")
    assert rec["target"] == "local" and rec["url"] == art.as_uri() and rec["files"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------------------------- S3

@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    fs.mkdir("models")
    yield fs, opts
    server.stop()


def test_publish_to_s3(tmp_path, s3):
    fs, opts = s3
    art = make_artifact(tmp_path)
    rec = publish(art, parse_target("s3://models/quantized", allow_urls=True), name="tiny-awq",
                  storage_options=opts)
    assert rec["url"] == "s3://models/quantized/tiny-awq"
    fs.invalidate_cache()
    for rel, data in local_files(art).items():
        assert fs.cat_file(f"models/quantized/tiny-awq/{rel}") == data
    manifest = json.loads(fs.cat_file(f"models/quantized/tiny-awq/{MANIFEST}"))
    assert sorted(e["path"] for e in manifest["files"]) == sorted(local_files(art))
    assert is_published(rec["url"], storage_options=opts) == manifest
    assert is_published("s3://models/quantized/other", storage_options=opts) is None


def test_s3_missing_bucket_is_a_publish_error(tmp_path, s3):
    _, opts = s3
    art = make_artifact(tmp_path)
    with pytest.raises(PublishError, match="no-such-bucket.*intact"):
        publish(art, "s3://no-such-bucket/x", name="v", storage_options=opts)


# ------------------------------------------------------------------------------------------------------ Hub

@pytest.fixture
def online(monkeypatch):
    """Hub offline mode (HF_HUB_OFFLINE, which some test runs set) would stop the requests these tests make."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_is_a_clear_error_and_retryable(tmp_path, online):
    art = make_artifact(tmp_path)
    before = snapshot(art)
    hub = HubSettings(token="hf_test", endpoint=f"http://127.0.0.1:{closed_port()}", org="acme")
    for _ in range(2):                                     # the retry fails the same way: nothing half-done
        with pytest.raises(PublishError) as err:
            publish(art, Target("hub"), name="gptq-w4", hub=hub)
        msg = str(err.value)
        assert "cannot reach" in msg and "acme/SmolLM2-135M-gptq-w4" in msg and str(art) in msg and "again" in msg
        assert snapshot(art) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_hub_refusing_token_is_a_clear_error(tmp_path, online):
    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self):
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        art = make_artifact(tmp_path)
        hub = HubSettings(token="hf_bad", endpoint=f"http://127.0.0.1:{server.server_address[1]}", org="acme")
        with pytest.raises(PublishError, match="401.*HF_TOKEN") as err:
            publish(art, "hub:other", name="v", hub=hub)
        assert "other/" in str(err.value) and "kept" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_hub_checks_before_any_network(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("HfApi must not be created before the settings are checked")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    art = make_artifact(tmp_path)
    with pytest.raises(SpecError, match="HF_TOKEN"):
        publish(art, Target("hub"), name="v", hub=HubSettings(token=None, org="acme"))
    with pytest.raises(SpecError, match="needs an org"):
        publish(art, Target("hub"), name="v", hub=HubSettings(token="hf_x"))
    with pytest.raises(SpecError, match="template"):
        publish(art, Target("hub"), name="v", hub=HubSettings(token="hf_x", org="a", name_template="{org}/{size}"))


def test_hub_publish_calls(tmp_path, monkeypatch, online):
    """The wiring against a stand-in HfApi (no Hub here): one private repo, one commit of the whole folder."""
    import huggingface_hub
    calls = []

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", endpoint, token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"http://hub.test/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("CommitInfo", (), {"oid": "f" * 40, "commit_url": "http://hub.test/c"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    art = make_artifact(tmp_path)
    rec = publish(art, "hub", name="awq-w4", hub=HubSettings(token="hf_x", endpoint="http://hub.test", org="acme"))
    assert rec["commit"] == "f" * 40 and rec["url"] == "http://hub.test/acme/SmolLM2-135M-awq-w4" and rec["files"] == 6
    assert calls[0] == ("init", "http://hub.test", "hf_x")
    assert calls[1] == ("create_repo", "acme/SmolLM2-135M-awq-w4",
                        {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = calls[2][1]
    assert upload["repo_id"] == "acme/SmolLM2-135M-awq-w4" and upload["folder_path"] == str(art)
    assert len(calls) == 3


def test_hub_offline_mode_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    art = make_artifact(tmp_path)
    with pytest.raises(PublishError, match="offline mode is on.*kept"):
        publish(art, "hub", name="v", hub=HubSettings(token="hf_x", endpoint="http://127.0.0.1:9", org="acme"))


def test_hub_settings_and_repo_names(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.internal/")
    monkeypatch.setenv("QUANTFARM_HUB_ORG", "acme")
    hub = HubSettings.from_env()
    assert (hub.token, hub.endpoint, hub.org, hub.private) == ("hf_abc", "http://hub.internal", "acme", True)
    assert hub_repo_id(hub, "meta-llama/Llama 3.1 (8B)", "gptq w4/g128") == "acme/Llama-3.1-8B-gptq-w4-g128"
    assert hub_repo_id(hub, "m", "v", org="other") == "other/m-v"
    assert hub_repo_id(HubSettings(name_template="me/{model}.{variant}"), "a/b", "c") == "me/b.c"


# ----------------------------------------------------------------------------------------------- parse_target

def test_parse_target():
    assert parse_target("", allow_urls=False) == Target("local")
    assert parse_target("hub", allow_urls=False) == Target("hub")
    assert parse_target("hub:acme", allow_urls=True) == Target("hub", org="acme")
    t = parse_target("file:///srv/models/", allow_urls=True)
    assert (t.kind, t.url, t.protocol, str(t)) == ("fsspec", "file:///srv/models", "file", "file:///srv/models")
    for url in ("s3://bucket/prefix", "file:///srv/models", "hub:acme"):
        with pytest.raises(SpecError, match="not (accepted|allowed)"):
            parse_target(url, allow_urls=False)
    with pytest.raises(SpecError, match="unknown protocol 'nosuchfs'"):
        parse_target("nosuchfs://x/y", allow_urls=True)
    with pytest.raises(SpecError, match="absolute path"):
        parse_target("file://relative/dir", allow_urls=True)
    with pytest.raises(SpecError, match="read-only"):
        parse_target("https://example.com/x", allow_urls=True)
    with pytest.raises(SpecError, match="unknown publish target"):
        parse_target("/srv/models", allow_urls=True)
    with pytest.raises(SpecError, match="no bucket"):
        parse_target("s3://", allow_urls=True)


def test_protocol_whose_package_is_missing_names_it():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(SpecError, match="needs the Python package 'gcsfs'.*pip install gcsfs"):
        parse_target("gs://bucket/prefix", allow_urls=True)
