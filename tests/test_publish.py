"""Publishing a finished artifact (service/job/publish.py, publish_files.py) to file://, to S3 (moto's server on
loopback), and to an unreachable or refusing Hub. The artifacts are tiny fake folders (one large one for the
atomicity check): these tests are about copying, not quantizing."""
import hashlib
import importlib.util
import json
import os
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from core.errors import ArtifactError, PublishError, SpecError
from service.job.publish import MANIFEST, Destination, HubSettings, hub_repo_id, is_published, parse_target, publish


REV = "0123456789abcdef0123456789abcdef01234567"      # the source's pinned revision (a Hub commit)
SMOL = "HuggingFaceTB/SmolLM2 135M"


def at(target: str, **credentials):
    """A trusted publish target with the server's credentials for it (hub=HubSettings, options=storage options)."""
    return replace(parse_target(target, allow_urls=True), **credentials)


def make_artifact(root, name="art", weights=b"\x01\x02" * 3000, model=SMOL, revision=REV, recipe="abc123"):
    """A folder shaped like one of ours; its report.json names the source, its revision and the recipe key."""
    folder = root / name
    folder.mkdir()
    qc = {"quant_method": "gptq", "bits": 4, "meta": {"quantizer": ["quantfarm:0.1.0"], "source_model": "org/Tiny-LM"}}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    (folder / "report.json").write_text(json.dumps({"recipe_key": recipe, "model": model, "revision": revision,
                                                    "spec": {"model": model}}))
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


def shelf_dir(root, model=SMOL, revision=REV):
    """Where the artifacts of (model, revision) go under a file:// target: MODEL-REV."""
    return root / f"{model.split('/')[-1].replace(' ', '-')}-{revision[:12]}"


def visible(folder):
    """What a reader listing the folder sees (temporary folders are hidden: their names start with '.')."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


# ---------------------------------------------------------------------------------------------------- file://

def test_publish_to_file_url_round_trip(tmp_path):
    art = make_artifact(tmp_path)
    dest = tmp_path / "served"
    rec = publish(art, parse_target(f"file://{dest}", allow_urls=True), name="tiny-gptq-w4")
    out = shelf_dir(dest) / "tiny-gptq-w4"
    assert out.parent.name == "SmolLM2-135M-0123456789ab"
    assert rec["url"] == out.as_uri() and rec["commit"] is None and rec["status"] == "published"
    assert rec["files"] == 6 and rec["bytes"] == sum(len(b) for b in local_files(art).values())
    got = local_files(out)
    manifest = json.loads(got.pop(MANIFEST))
    assert got == local_files(art)                       # byte for byte, nothing else besides the manifest
    assert (manifest["source"], manifest["revision"], manifest["recipe_key"]) == (SMOL, REV, "abc123")
    assert manifest["name"] == "tiny-gptq-w4" and manifest["path"] == "SmolLM2-135M-0123456789ab/tiny-gptq-w4"
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]} == \
        {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in got.items()}
    assert is_published(rec["url"]) == manifest
    assert visible(dest) == [out.parent.name] and os.listdir(out.parent) == ["tiny-gptq-w4"]   # no temporary left

    (out / "model.safetensors").write_bytes(b"truncated")  # a listed file with another size: not published
    assert is_published(rec["url"]) is None
    assert is_published((tmp_path / "nowhere").as_uri()) is None


def test_two_models_with_the_same_settings_get_two_folders(tmp_path):
    """The outside test's finding: two submitters' models, published with the same label to the same target,
    landed in one folder and the second replaced the first. Now each model (and revision) has its own."""
    url = f"file://{tmp_path / 'served'}"
    a = make_artifact(tmp_path, "a", weights=b"A" * 5000, model="/models/merged/llama", revision="1" * 64, recipe="ka")
    b = make_artifact(tmp_path, "b", weights=b"B" * 7000, model="/other/llama", revision="2" * 64, recipe="kb")
    c = make_artifact(tmp_path, "c", weights=b"C" * 6000, model="/models/merged/llama", revision="3" * 64, recipe="kc")
    recs = [publish(art, url, name="rtn-gptq-w4-g32") for art in (a, b, c)]
    assert len({r["url"] for r in recs}) == 3 and all(r["status"] == "published" for r in recs)
    assert visible(tmp_path / "served") == ["llama-111111111111", "llama-222222222222", "llama-333333333333"]
    for art, rec, key in zip((a, b, c), recs, ("ka", "kb", "kc")):
        manifest = is_published(rec["url"])
        assert manifest and manifest["recipe_key"] == key
        got = local_files(tmp_path / "served" / manifest["path"])
        got.pop(MANIFEST)
        assert got == local_files(art)                     # each intact, byte for byte


def test_republish_of_the_same_recipe_replaces_and_drops_old_shards(tmp_path):
    art = make_artifact(tmp_path)
    (art / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    url = f"file://{tmp_path / 'served'}"
    assert publish(art, url, name="v")["status"] == "published"
    (art / "model-00002-of-00002.safetensors").unlink()
    (art / "model.safetensors").write_bytes(b"new weights")
    assert publish(art, url, name="v")["status"] == "replaced"     # a rebuild of the same recipe: allowed
    out = shelf_dir(tmp_path / "served") / "v"
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert is_published(out.as_uri())
    assert os.listdir(out.parent) == ["v"]                           # the old folder, renamed aside, is gone


def test_same_artifact_again_is_a_no_op(tmp_path, monkeypatch):
    art = make_artifact(tmp_path)
    url = f"file://{tmp_path / 'served'}"
    first = publish(art, url, name="v")
    out = shelf_dir(tmp_path / "served") / "v"
    before = snapshot(out)

    def no_copy(*args, **kwargs):
        raise AssertionError("nothing may be copied for an artifact that is there already")

    monkeypatch.setattr(LocalFileSystem, "put_file", no_copy)
    again = publish(art, url, name="v")
    assert again["status"] == "unchanged" and again["url"] == first["url"]
    assert snapshot(out) == before                                   # not rewritten: same bytes, same mtimes


def test_another_artifact_in_the_folder_is_refused_unless_replace(tmp_path):
    url = f"file://{tmp_path / 'served'}"
    first = make_artifact(tmp_path, "first", weights=b"1" * 4000, recipe="recipe-one")
    other = make_artifact(tmp_path, "other", weights=b"2" * 4000, recipe="recipe-two")   # same model, same name
    publish(first, url, name="v")
    out = shelf_dir(tmp_path / "served") / "v"
    before = snapshot(out)
    with pytest.raises(PublishError) as err:
        publish(other, url, name="v")
    msg = str(err.value)
    assert "holds another artifact" in msg and "recipe recipe-one" in msg and "recipe recipe-two" in msg
    assert "--replace" in msg and "--publish-replace" in msg and "--name" in msg and "nothing was written" in msg
    assert snapshot(out) == before and os.listdir(out.parent) == ["v"]
    rec = publish(other, url, name="v", replace=True)                # the operator's choice
    assert rec["status"] == "replaced" and is_published(rec["url"])["recipe_key"] == "recipe-two"
    assert (out / "model.safetensors").read_bytes() == b"2" * 4000 and os.listdir(out.parent) == ["v"]

    # a folder that is no publication of ours (no manifest) is not overwritten either
    foreign = make_artifact(tmp_path, "foreign-src")
    (tmp_path / "served2" / shelf_dir(tmp_path).name / "v").mkdir(parents=True)
    (tmp_path / "served2" / shelf_dir(tmp_path).name / "v" / "notes.txt").write_text("someone's files")
    with pytest.raises(PublishError, match="not a quantfarm publication"):
        publish(foreign, f"file://{tmp_path / 'served2'}", name="v")
    assert (tmp_path / "served2" / shelf_dir(tmp_path).name / "v" / "notes.txt").read_text() == "someone's files"


def test_concurrent_publishers_of_one_folder_one_wins_whole(tmp_path, monkeypatch):
    """Two recipes published under one name at the same moment: both copy (slowly, overlapping), one renames its
    folder in, the other is refused when it decides again just before its rename; nothing is mixed."""
    url = f"file://{tmp_path / 'served'}"
    arts = [make_artifact(tmp_path, f"a{i}", weights=bytes([i]) * 9000, recipe=f"recipe-{i}") for i in range(2)]
    real_put = LocalFileSystem.put_file

    def slow_put(self, lpath, rpath, *args, **kwargs):
        time.sleep(0.02)
        return real_put(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", slow_put)
    results = [None, None]

    def run(i):
        try:
            results[i] = publish(arts[i], url, name="v")
        except PublishError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [i for i in range(2) if isinstance(results[i], dict)]
    assert len(won) == 1, results
    assert "holds another artifact" in str(results[1 - won[0]])
    out = shelf_dir(tmp_path / "served") / "v"
    assert is_published(out.as_uri())["recipe_key"] == f"recipe-{won[0]}"
    got = local_files(out)
    got.pop(MANIFEST)
    assert got == local_files(arts[won[0]]) and os.listdir(out.parent) == ["v"]


class Reader:
    """Polls a published folder every 2 ms the way a loader would (list it, read the manifest, stat each file),
    through one directory handle so that each look is at one folder; records what it saw."""

    def __init__(self, dest):
        self.dest, self.seen, self.partial, self.stop, self.looks = dest, [], [], threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def look(self):
        try:
            fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return "absent"
        try:
            names = set(os.listdir(fd))
            strays = [n for n in visible(self.dest.parent) if n != self.dest.name]
            try:
                with open(MANIFEST, "rb", opener=lambda p, f: os.open(p, f, dir_fd=fd)) as f:
                    manifest = json.loads(f.read())
                listed = {e["path"]: e for e in manifest["files"]}
                sizes = {n: os.stat(n, dir_fd=fd).st_size for n in names - {MANIFEST}}
                whole = set(sizes) == set(listed) and all(sizes[n] == e["size"] for n, e in listed.items())
            except (FileNotFoundError, ValueError, KeyError):
                whole = False
            if not whole or strays:
                if os.fstat(fd).st_ino != os.stat(self.dest).st_ino:
                    return "stale"             # this handle's folder was swapped away meanwhile: look again
                return f"partial: {sorted(names)} {strays}"
            return listed["model.safetensors"]["sha256"]
        except FileNotFoundError:
            return "stale"
        finally:
            os.close(fd)

    def _run(self):
        while not self.stop.is_set():
            seen = self.look()
            self.looks += 1
            (self.partial if seen.startswith("partial") else self.seen).append(seen)
            time.sleep(0.002)

    def finish(self):
        self.stop.set()
        self.thread.join()


def test_a_reader_never_sees_a_partial_folder(tmp_path, monkeypatch):
    """A 64 MiB weights file copied slowly (4 MiB at a time): the folder at the published path is absent, the
    old complete one or the new complete one, whenever a reader looks, for a first publish and for a replace."""
    big = os.urandom(64 << 20)
    v1 = make_artifact(tmp_path, "v1", weights=big)
    v2 = make_artifact(tmp_path, "v2", weights=big[: -8192] + b"\0" * 12288)    # the same recipe rebuilt, longer
    sha = {v: hashlib.sha256((v / "model.safetensors").read_bytes()).hexdigest() for v in (v1, v2)}
    copies, readers = [], []

    def slow_put(self, lpath, rpath, *args, **kwargs):
        copies.append(readers[-1].looks)           # how many looks the reader had taken when this file began
        with open(lpath, "rb") as src, open(rpath, "wb") as dst:
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                dst.flush()
                time.sleep(0.004)
        time.sleep(0.01)

    monkeypatch.setattr(LocalFileSystem, "put_file", slow_put)
    url = f"file://{tmp_path / 'served'}"
    dest = shelf_dir(tmp_path / "served") / "v"
    dest.parent.mkdir(parents=True)
    for art, before, status in ((v1, {"absent"}, "published"), (v2, {sha[v1]}, "replaced")):
        reader = Reader(dest)
        readers.append(reader)
        copies.clear()
        time.sleep(0.01)
        try:
            assert publish(art, url, name="v")["status"] == status
            time.sleep(0.01)
        finally:
            reader.finish()
        assert not reader.partial, reader.partial[:3]
        states = [s for s in reader.seen if s != "stale"]
        assert set(states) <= before | {"absent", sha[art]}, set(states)
        assert states[0] in before and states[-1] == sha[art], states[:3]
        assert len(copies) == 6 and copies[-1] - copies[0] >= 3, copies     # it looked while the files were copied
    assert (dest / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()


def test_interrupted_upload_keeps_the_published_folder_and_retry_completes(tmp_path, monkeypatch):
    art = make_artifact(tmp_path)
    url = f"file://{tmp_path / 'served'}"
    publish(art, url, name="v")                           # an earlier, complete publish under the same name
    out = shelf_dir(tmp_path / "served") / "v"
    published_before = snapshot(out)
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
    assert "nothing changed there" in msg
    assert snapshot(out) == published_before              # the earlier publish is there, whole and untouched
    assert os.listdir(out.parent) == ["v"]                # the temporary folder is gone
    assert snapshot(art) == before                        # the local artifact is untouched

    monkeypatch.setattr(LocalFileSystem, "put_file", real_put)
    rec = publish(art, url, name="v")
    assert rec["status"] == "replaced" and is_published(rec["url"])
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


def recording(monkeypatch, url, opts):
    """The writes publish makes through the (cached) filesystem instance it gets for url, in order."""
    fs, _ = fsspec.core.url_to_fs(url, **opts)
    log = []
    for method in ("put_file", "pipe_file", "rm_file"):
        real = getattr(fs, method)

        def wrapped(path, *args, _real=real, _method=method, **kwargs):
            log.append((_method, (args[0] if _method == "put_file" else path).rsplit("/", 1)[-1]))
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(fs, method, wrapped)
    return log


def test_publish_to_s3(tmp_path, s3, monkeypatch):
    fs, opts = s3
    art = make_artifact(tmp_path)
    log = recording(monkeypatch, "s3://models/quantized", opts)
    rec = publish(art, at("s3://models/quantized", options=opts), name="tiny-awq")
    key = "models/quantized/SmolLM2-135M-0123456789ab/tiny-awq"
    assert rec["url"] == f"s3://{key}" and rec["status"] == "published"
    assert log[-1] == ("pipe_file", MANIFEST) and len(log) == 7      # six files, then the manifest last
    fs.invalidate_cache()
    for rel, data in local_files(art).items():
        assert fs.cat_file(f"{key}/{rel}") == data
    manifest = json.loads(fs.cat_file(f"{key}/{MANIFEST}"))
    assert sorted(e["path"] for e in manifest["files"]) == sorted(local_files(art))
    assert (manifest["source"], manifest["revision"], manifest["recipe_key"]) == (SMOL, REV, "abc123")
    assert is_published(rec["url"], storage_options=opts) == manifest
    assert is_published("s3://models/quantized/other", storage_options=opts) is None

    log.clear()                                            # the same files again: nothing is written
    assert publish(art, at("s3://models/quantized", options=opts), name="tiny-awq")["status"] == "unchanged"
    assert log == []
    other = make_artifact(tmp_path, "other", weights=b"\x07" * 100, recipe="another-recipe")
    with pytest.raises(PublishError, match="holds another artifact.*--replace"):
        publish(other, at("s3://models/quantized", options=opts), name="tiny-awq")
    assert log == [] and is_published(rec["url"], storage_options=opts) == manifest
    rec = publish(other, at("s3://models/quantized", options=opts), name="tiny-awq", replace=True)
    # the old manifest goes before the first file, the new one comes after the last
    assert rec["status"] == "replaced" and log[0] == ("rm_file", MANIFEST) and log[-1] == ("pipe_file", MANIFEST)
    fs.invalidate_cache()
    assert is_published(rec["url"], storage_options=opts)["recipe_key"] == "another-recipe"
    assert fs.cat_file(f"{key}/model.safetensors") == b"\x07" * 100


def test_s3_folder_without_its_manifest_is_not_published_and_retry_completes(tmp_path, s3, monkeypatch):
    """An upload cut off after two files: the files there, no manifest; readers must not take it, and
    publishing again (no --replace needed: no other artifact's manifest is there) completes it."""
    fs, opts = s3
    art = make_artifact(tmp_path)
    target = "s3://models/cut"
    pub_fs, _ = fsspec.core.url_to_fs(target, **opts)
    real_put, calls = pub_fs.put_file, []

    def failing_put(lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) > 2:
            raise ConnectionResetError("connection reset by peer")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(pub_fs, "put_file", failing_put)
    with pytest.raises(PublishError, match="after 2 of 6 files.*no manifest there.*intact"):
        publish(art, at(target, options=opts), name="v")
    key = "models/cut/SmolLM2-135M-0123456789ab/v"
    fs.invalidate_cache()
    assert len(fs.find(key)) == 2 and not fs.exists(f"{key}/{MANIFEST}")
    assert is_published(f"s3://{key}", storage_options=opts) is None
    monkeypatch.setattr(pub_fs, "put_file", real_put)
    rec = publish(art, at(target, options=opts), name="v")
    assert rec["status"] == "published" and is_published(rec["url"], storage_options=opts)
    fs.invalidate_cache()
    fs.rm_file(f"{key}/{MANIFEST}")                        # complete files, manifest gone: not published
    assert is_published(rec["url"], storage_options=opts) is None
    fs.pipe_file(f"{key}/{MANIFEST}", b'{"format": "quantfarm-manifest/2", "files": []}')
    assert is_published(rec["url"], storage_options=opts) is None        # a manifest listing nothing


def test_s3_missing_bucket_is_a_publish_error(tmp_path, s3):
    _, opts = s3
    art = make_artifact(tmp_path)
    with pytest.raises(PublishError, match="no-such-bucket.*intact"):
        publish(art, at("s3://no-such-bucket/x", options=opts), name="v")


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
            publish(art, Destination("hub", hub=hub), name="gptq-w4")
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
            publish(art, at("hub:other", hub=hub), name="v")
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
        publish(art, Destination("hub", hub=HubSettings(token=None, org="acme")), name="v")
    with pytest.raises(SpecError, match="needs an org"):
        publish(art, Destination("hub", hub=HubSettings(token="hf_x")), name="v")
    with pytest.raises(SpecError, match="template"):
        publish(art, Destination("hub", hub=HubSettings(token="hf_x", org="a", name_template="{org}/{size}")), name="v")
    for template in ("{org}/{variant}", "{org}/models"):      # repos shared by models or by variants: refused
        with pytest.raises(SpecError, match="must contain {model} and {variant}"):
            publish(art, Destination("hub", hub=HubSettings(token="hf_x", org="a", name_template=template)), name="v")


class FakeHub:
    """A stand-in HfApi (there is no Hub here) that keeps each repo's files in memory: create_repo, one
    upload_folder commit mirroring a folder, hf_hub_download of a committed file."""
    repos: dict = {}
    calls: list = []

    def __init__(self, endpoint=None, token=None):
        self.calls.append(("init", endpoint, token))

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        self.repos.setdefault(repo_id, {})
        return f"http://hub.test/{repo_id}"

    def hf_hub_download(self, repo_id, filename, *, repo_type=None, local_dir=None):
        from huggingface_hub.errors import EntryNotFoundError
        self.calls.append(("download", repo_id, filename))
        if filename not in self.repos.get(repo_id, {}):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        (Path(local_dir) / filename).write_bytes(self.repos[repo_id][filename])
        return str(Path(local_dir) / filename)

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        folder = Path(kw["folder_path"])
        self.repos[kw["repo_id"]] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        return type("CommitInfo", (), {"oid": "f" * 40, "commit_url": "http://hub.test/c"})()


@pytest.fixture
def fake_hub(monkeypatch, online):
    import huggingface_hub
    FakeHub.repos, FakeHub.calls = {}, []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_hub_publish_calls(tmp_path, fake_hub):
    """The wiring: one private repo, a look at what it holds, one commit of the whole folder."""
    art = make_artifact(tmp_path)
    rec = publish(art, at("hub", hub=HubSettings(token="hf_x", endpoint="http://hub.test", org="acme")), name="awq-w4")
    assert rec["commit"] == "f" * 40 and rec["url"] == "http://hub.test/acme/SmolLM2-135M-awq-w4" and rec["files"] == 6
    assert rec["status"] == "published"
    calls = fake_hub.calls
    assert calls[0] == ("init", "http://hub.test", "hf_x")
    assert calls[1] == ("create_repo", "acme/SmolLM2-135M-awq-w4",
                        {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2] == ("download", "acme/SmolLM2-135M-awq-w4", "report.json")
    upload = calls[3][1]
    assert upload["repo_id"] == "acme/SmolLM2-135M-awq-w4" and upload["folder_path"] == str(art)
    assert len(calls) == 4


def test_hub_repo_of_another_source_is_refused_unless_replace(tmp_path, fake_hub):
    """org1/Tiny and org2/Tiny with one variant name meet in one repo ({org}/{model}-{variant}): the second is
    refused and the first stays; the same recipe again updates it; replace takes the repo over."""
    hub = HubSettings(token="hf_x", endpoint="http://hub.test", org="acme")
    first = make_artifact(tmp_path, "a", model="org1/Tiny", revision="1" * 40, recipe="r1")
    assert publish(first, at("hub", hub=hub), name="w4")["status"] == "published"
    held = dict(fake_hub.repos["acme/Tiny-w4"])
    other = make_artifact(tmp_path, "b", weights=b"\x07" * 10, model="org2/Tiny", revision="2" * 40, recipe="r2")
    with pytest.raises(PublishError, match=r"holds another artifact \(org1/Tiny at revision 111111111111.*than this one \(org2/Tiny"):
        publish(other, at("hub", hub=hub), name="w4")
    assert fake_hub.repos["acme/Tiny-w4"] == held
    again = make_artifact(tmp_path, "c", weights=b"\x03" * 10, model="org1/Tiny", revision="1" * 40, recipe="r1")
    assert publish(again, at("hub", hub=hub), name="w4")["status"] == "updated"
    assert publish(other, at("hub", hub=hub), name="w4", replace=True)["status"] == "replaced"
    assert fake_hub.repos["acme/Tiny-w4"]["model.safetensors"] == b"\x07" * 10


def test_hub_offline_mode_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    art = make_artifact(tmp_path)
    with pytest.raises(PublishError, match="offline mode is on.*kept"):
        publish(art, at("hub", hub=HubSettings(token="hf_x", endpoint="http://127.0.0.1:9", org="acme")), name="v")


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
    assert parse_target("", allow_urls=False) == Destination("local")
    assert parse_target("hub", allow_urls=False) == Destination("hub")
    assert parse_target("hub:acme", allow_urls=True) == Destination("hub", org="acme")
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
