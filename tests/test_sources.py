"""service.sources against real models: the SmolLM2 demo GGUF, tiny random Llamas on disk, and a loopback
HTTP server speaking the few Hub routes huggingface_hub uses (the real Hub is unreachable here)."""

import hashlib
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from core.errors import ModelSourceError, UnsafeModelError
from service.job.loading import load_model
from service.job.models import DEMO_MODELS, resolve_model
from service.job.sources import Access, ResolvedModel

SHA = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(autouse=True)
def _clean_hub_env(monkeypatch):
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def demo_loaded():
    resolved = resolve_model("smollm2-135m")
    return resolved, *load_model(resolved)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with save_pretrained (safetensors) plus a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    words = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "Paris", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _to_pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _add_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------ loopback hub

class FakeHub:
    """Answers model_info, the tree listing and /resolve/ (HEAD + GET) like the Hub, and logs every request."""

    def __init__(self):
        self.repos: dict[str, dict] = {}      # repo_id -> {"files": {name: bytes}, "gated": bool}
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add(self, repo_id: str, folder: Path, gated: bool = False, sizes: dict | None = None) -> None:
        """`sizes`: what model_info lists for some files instead of their length (a 20 GB shard, in a test)."""
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        files["README.md"] = b"# not a model file\n"
        self.repos[repo_id] = {"files": files, "gated": gated, "sizes": sizes or {}}

    def requested(self, suffix: str) -> list[str]:
        return [path for _, path in self.log if path.endswith(suffix)]

    def _send(self, h, status: int, payload: bytes = b"", headers: dict | None = None, body: bool = True):
        h.send_response(status)
        for k, v in {"Content-Length": str(len(payload)), **(headers or {})}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _answer(self, h, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.log.append((h.command, path))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        rest = parts[4:] if api else parts[2:]
        rev = rest[1] if len(rest) > 1 else "main"
        if rev not in ("main", SHA):
            return self._send(h, 404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, body)
        files = repo["files"]
        if api and (not rest or rest[0] == "revision"):                       # model_info (blobs: sizes too)
            blobs = "blobs=true" in urlsplit(h.path).query.lower()
            info = {"id": repo_id, "modelId": repo_id, "sha": SHA, "private": False, "gated": repo["gated"],
                    "siblings": [{"rfilename": n, **({"size": repo["sizes"].get(n, len(b))} if blobs else {})}
                                 for n, b in sorted(files.items())]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if api and rest[0] == "tree":                                           # list_repo_tree (snapshot_download)
            tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in sorted(files.items())]
            return self._send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if not api and rest and rest[0] == "resolve":                          # hf_hub_download: HEAD then GET
            if repo["gated"]:
                return self._send(h, 401, b"gated", {"X-Error-Code": "GatedRepo",
                                                      "X-Error-Message": "Access to model is restricted."}, body)
            name = "/".join(rest[2:])
            if name not in files:
                return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA}, body)
            data = files[name]
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": SHA}
            return self._send(h, 200, data, headers, body)
        return self._send(h, 404, b"", {}, body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ demo

def test_demo_resolves_with_stable_hash():
    a, b = resolve_model("smollm2-135m"), resolve_model("smollm2-135m")
    assert a.kind == "demo" and a.gguf_file == DEMO_MODELS["smollm2-135m"].filename
    assert (Path(a.path) / a.gguf_file).is_file()
    assert a.revision is None and len(a.content_hash) == 64
    assert a == b


def test_gguf_source_card_is_read_once_per_file(monkeypatch, tmp_path):
    """The license and languages of a GGUF source come from its fields the first time, from the cache after."""
    from service.job.loading import source_card
    monkeypatch.setenv("QUANTFARM_CACHE", str(tmp_path / "cache"))
    resolved = resolve_model("smollm2-135m")
    first = source_card(resolved)
    assert first == {"name": "smollm2-135m", "license": "apache-2.0", "language": ["en"]}
    (cached,) = (tmp_path / "cache" / "gguf").glob("*-card.json")
    cached.write_text(json.dumps({"license": "from-the-cache"}))      # a second call reads only the cache
    assert source_card(resolved) == {"name": "smollm2-135m", "license": "from-the-cache"}


def test_demo_loads_dequantized_llama(demo_loaded):
    _, model, tokenizer = demo_loaded
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("Paris")["input_ids"]
    assert ids and "Paris" in tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------------ local

def test_local_dir_resolves_and_loads(tiny_dir):
    a, b = resolve_model(str(tiny_dir)), resolve_model(str(tiny_dir))
    assert a.kind == "local" and a.path == str(tiny_dir.resolve()) and a.revision is None
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    model, tokenizer = load_model(a)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    ids = torch.tensor([tokenizer("the capital of france is Paris")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 32)


def test_local_content_hash_follows_weights(tiny_dir, tmp_path):
    copy = _copy(tiny_dir, tmp_path / "m")
    before = resolve_model(str(copy)).content_hash
    assert before == resolve_model(str(tiny_dir)).content_hash      # identity is content, not location
    (copy / "generation_config.json").write_text('{"do_sample": false}')
    assert resolve_model(str(copy)).content_hash != before


def test_local_pickle_only_is_refused_unless_allowed(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "pickled")
    _to_pickle_only(folder)
    with pytest.raises(UnsafeModelError, match="safetensors"):
        resolve_model(str(folder))
    resolved = resolve_model(str(folder), access=Access(allow_pickle=True))
    model, _ = load_model(resolved)
    reference, _ = load_model(resolve_model(str(tiny_dir)))
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


def test_local_custom_code_needs_trust(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "custom")
    _add_auto_map(folder)
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), access=Access(trust_remote_code=True)).trust_remote_code


def test_local_dir_without_weights(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "empty")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="no weights") as info:
        resolve_model(str(folder))
    assert not isinstance(info.value, UnsafeModelError)


@pytest.mark.parametrize("ref", ["not a model", "just-a-name", "/no/such/dir", "a/b/c", "x/y..z"])
def test_unrecognised_refs_say_what_is_accepted(ref):
    with pytest.raises(ModelSourceError, match="Accepted"):
        resolve_model(ref)


def test_gguf_path_resolves_with_same_identity_as_demo():
    demo = resolve_model("smollm2-135m")
    by_path = resolve_model(str(Path(demo.path) / demo.gguf_file))
    assert (by_path.kind, by_path.path, by_path.gguf_file) == ("gguf", demo.path, demo.gguf_file)
    assert by_path.content_hash == demo.content_hash


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


# ------------------------------------------------------------------------------------------------ hub

def test_hub_unreachable_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelSourceError, match="cannot reach the Hugging Face Hub at http://127.0.0.1"):
        resolve_model("org/model", access=Access(cache_dir=str(tmp_path)))


def test_hub_offline_without_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot reach.*HF_HUB_OFFLINE"):
        resolve_model("org/model", access=Access(cache_dir=str(tmp_path)))


def test_hub_resolves_pinned_sha_then_works_offline(hub, tiny_dir, tmp_path, monkeypatch):
    hub.add("org/tiny", tiny_dir)
    resolved = resolve_model("org/tiny", access=Access(cache_dir=str(tmp_path)))
    assert resolved.kind == "hub" and resolved.revision == SHA and resolved.content_hash == SHA
    folder = Path(resolved.path)
    assert folder.name == SHA and folder.is_relative_to(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not hub.requested("README.md")              # only what loading needs is fetched
    model, _ = load_model(resolved)
    assert model.config.num_hidden_layers == 2

    assert resolve_model(f"org/tiny@{SHA}", access=Access(cache_dir=str(tmp_path))).revision == SHA
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # now served from the cache, no request
    before = len(hub.log)
    cached = resolve_model("org/tiny", access=Access(cache_dir=str(tmp_path)))
    assert (cached.path, cached.revision) == (resolved.path, SHA) and len(hub.log) == before


def test_hub_pickle_only_refused_before_download(hub, tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "pickled")
    _to_pickle_only(folder)
    hub.add("org/pickled", folder)
    with pytest.raises(UnsafeModelError, match="allow_pickle"):
        resolve_model("org/pickled", access=Access(cache_dir=str(tmp_path / "cache")))
    assert hub.log and not hub.requested(".bin")
    resolved = resolve_model("org/pickled", access=Access(allow_pickle=True, cache_dir=str(tmp_path / "cache")))
    assert hub.requested(".bin") and (Path(resolved.path) / "pytorch_model.bin").is_file()


def test_hub_custom_code_refused_before_weights(hub, tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "custom")
    _add_auto_map(folder)
    hub.add("org/custom", folder)
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        resolve_model("org/custom", access=Access(cache_dir=str(tmp_path / "cache")))
    assert hub.requested("config.json") and not hub.requested(".safetensors")


def test_hub_not_found(hub, tmp_path):
    with pytest.raises(ModelSourceError, match="not found or private.*HF_TOKEN"):
        resolve_model("org/missing", access=Access(cache_dir=str(tmp_path)))


def test_hub_unknown_revision(hub, tiny_dir, tmp_path):
    hub.add("org/tiny", tiny_dir)
    with pytest.raises(ModelSourceError, match="no revision 'v9'"):
        resolve_model("org/tiny", revision="v9", access=Access(cache_dir=str(tmp_path)))


def test_hub_gated(hub, tiny_dir, tmp_path):
    hub.add("org/gated", tiny_dir, gated=True)
    with pytest.raises(ModelSourceError, match="gated: accept its license.*HF_TOKEN"):
        resolve_model("org/gated", access=Access(cache_dir=str(tmp_path)))


def test_resolved_model_is_frozen():
    resolved = resolve_model("smollm2-135m")
    assert isinstance(resolved, ResolvedModel)
    with pytest.raises(Exception):
        resolved.kind = "hub"  # type: ignore[misc]
