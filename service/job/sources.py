"""What a resolved model source is (ResolvedModel), which of a model's files make it up, and its identity.

Why apart from the resolution in models.py: the same rules judge a Hub listing before any download
(hub_source.py), a local folder (models.py), a cached snapshot and the weights fetched later (hub_weights.py),
and all of those speak of ResolvedModel; from here each imports them downward, with no import cycle.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ModelSourceError, UnsafeModelError


@dataclass(frozen=True)
class Weights:
    """A Hub model's weight files that resolving with weights=False left unfetched: admission reads a model's
    config and index only, and the worker fetches these (hub_weights.fetch_weights) after its checks."""
    repo_id: str
    files: tuple[tuple[str, int | None], ...]     # (file name, bytes as the Hub lists it; None: not listed)
    cache_dir: str | None
    endpoint: str

    @property
    def nbytes(self) -> int:
        return sum(size or 0 for _, size in self.files)


@dataclass(frozen=True)
class Access:
    """What a source may be and where it may come from: pickled weights and remote code (a spec asks for them,
    the server's policy allows them), the local folders the server allows (None: anywhere) and the Hub cache
    folder (None: huggingface_hub's own)."""
    allow_pickle: bool = False
    trust_remote_code: bool = False
    local_roots: tuple | None = None
    cache_dir: str | None = None

    @classmethod
    def of(cls, spec, local_roots=None) -> "Access":
        """A JobSpec's or ReleaseSpec's flags, under the server's roots."""
        return cls(spec.allow_pickle, spec.trust_remote_code, None if local_roots is None else tuple(local_roots))

    @property
    def flags(self) -> dict:
        return {"allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code}


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


@dataclass(frozen=True)
class FileSelection:
    """Which top-level files of a model make up what we load: small metadata files and the weights."""
    meta: tuple[str, ...]
    weights: tuple[str, ...]
    pickle: bool               # the weights are pickle files (loaded with use_safetensors=False)
    index: str | None          # sharded weights: the index file naming the shards


def select_files(names: list[str], where: str, *, allow_pickle: bool, trust_remote_code: bool) -> FileSelection:
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
            return FileSelection(tuple(meta), tuple(safetensors), False, "model.safetensors.index.json")
        if "model.safetensors" in top:   # ignore extra copies such as Mistral's consolidated.safetensors
            safetensors = ["model.safetensors"]
        return FileSelection(tuple(meta), tuple(safetensors), False, None)
    if pickles:
        if not allow_pickle:
            raise UnsafeModelError(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}); loading pickle can run arbitrary code. "
                "Convert the checkpoint to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True)), "
                "or set allow_pickle=true if you trust its author.")
        index = "pytorch_model.bin.index.json" if "pytorch_model.bin.index.json" in top else None
        return FileSelection(tuple(meta), tuple(pickles), True, index)
    raise ModelSourceError(f"{where} has a config.json but no weights (*.safetensors, or pickle *.bin/*.pt).")


def check_remote_code(config_path: Path, where: str, trust_remote_code: bool) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{where}: cannot read config.json: {e}") from e
    if config.get("auto_map") and not trust_remote_code:
        raise UnsafeModelError(
            f"{where} needs custom code (config.json has auto_map: {sorted(config['auto_map'])}), which runs "
            "arbitrary Python from the model's author. Set trust_remote_code=true only if you trust it.")


def narrow_to_index(plan: FileSelection, folder: Path, where: str) -> FileSelection:
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
    return FileSelection(plan.meta, tuple(shards), plan.pickle, plan.index)


def inspect_dir(folder: Path, where: str, *, allow_pickle: bool, trust_remote_code: bool) -> FileSelection:
    """The same rules as for a Hub listing, applied to files on disk (a local dir or a cached snapshot)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    plan = select_files(names, where, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    check_remote_code(folder / "config.json", where, trust_remote_code)
    return narrow_to_index(plan, folder, where)


# --------------------------------------------------------------------------------------------- content hashing

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
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


def dir_hash(folder: Path, names: list[str]) -> str:
    """Identity of a local model: its file names with their content hashes (names matter: which file is config)."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{file_sha256(folder / name)}\n".encode())
    return h.hexdigest()
