"""The Hugging Face Hub as a model source: a repo pinned to its commit with its small files fetched (the
weights are left pending for hub_weights.py), the local cache when the Hub cannot be reached, and what the
Hub's failures mean for the user.

Why by commit: a job's recipe key is its spec hashed with the model's identity, so a Hub model's identity is
the commit model_info pins, never a moving branch name, and every file is fetched from that one commit.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

from core.errors import ModelSourceError
from core.paths import write_atomic

from .sources import Access, ResolvedModel, Weights, check_remote_code, inspect_dir, narrow_to_index, select_files

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(repo_id: str) -> bool:
    return bool(_REPO_ID.match(repo_id)) and ".." not in repo_id and "--" not in repo_id \
        and not repo_id.endswith((".", "-"))


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


def connection_errors() -> tuple[type[BaseException], ...]:
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


def resolve_hub(ref: str, repo_id: str, revision: str | None, access: Access) -> ResolvedModel:
    """The repo pinned to its commit with its small files fetched (config, tokenizer, generation config, weight
    index): what admission needs. The weights it names, with their sizes from the Hub's file metadata (else
    the index's total), are left `pending`: a 20 GB shard is no request thread's business."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint, where = _endpoint(), f"{repo_id}@{revision or 'main'}"
    flags, cache_dir = access.flags, access.cache_dir
    if offline():
        return _resolve_from_cache(ref, repo_id, revision, access, endpoint, "offline mode is on (HF_HUB_OFFLINE)")
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        sha = info.sha
        if not sha:
            raise ModelSourceError(f"the Hub at {endpoint} gave no commit sha for {where}; is HF_ENDPOINT a Hub?")
        names = [s.rfilename for s in (info.siblings or [])]
        plan = select_files(names, f"Hub model {where}", **flags)  # refuses pickle-only repos before any download
        meta = [*plan.meta, *([plan.index] if plan.index else [])]
        folder = Path(snapshot_download(repo_id, allow_patterns=[glob.escape(n) for n in meta], revision=sha,
                                        cache_dir=cache_dir, endpoint=endpoint))
        check_remote_code(folder / "config.json", f"Hub model {where}", access.trust_remote_code)
        plan = narrow_to_index(plan, folder, f"Hub model {where}")
        _remember_ref(folder, revision or "main", sha)
    except HfHubHTTPError as e:
        raise hub_error(e, repo_id, revision, endpoint) from e
    except connection_errors() as e:
        return _resolve_from_cache(ref, repo_id, revision, access, endpoint, f"{type(e).__name__}: {e}")
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    files = tuple((n, sizes.get(n)) for n in plan.weights)
    if plan.index and any(size is None for _, size in files):
        files = sizes_from_index(folder / plan.index, files)
    pending = Weights(repo_id, files, cache_dir, endpoint)
    return ResolvedModel("hub", ref, str(folder), None, sha, sha, pending=pending, **flags)


def hub_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> ModelSourceError:
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


def _resolve_from_cache(ref: str, repo_id: str, revision: str | None, access: Access, endpoint: str,
                        reason: str) -> ResolvedModel:
    """No Hub: use a snapshot already in the cache (its folder name is the commit sha), or say how to get one."""
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=access.cache_dir, revision=revision)
    if not isinstance(hit, str):
        raise ModelSourceError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({reason}) and {repo_id}@{revision or 'main'} is not "
            "in the local cache: check the network or HF_ENDPOINT, use a local model directory, or pre-download it "
            "(hf download <repo>) and retry.")
    folder = Path(hit).parent
    log.warning("Hub unreachable (%s): using cached snapshot %s", reason, folder)
    inspect_dir(folder, f"cached Hub model {repo_id}", **access.flags)
    return ResolvedModel("hub", ref, str(folder), None, folder.name, folder.name, **access.flags)


def sizes_from_index(index: Path, files: tuple) -> tuple:
    """The index's metadata.total_size spread over its shards when the Hub listed no sizes (a mirror that
    answers without file metadata): the total is what the disk check needs."""
    try:
        total = int(json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return files
    return tuple((n, total // len(files)) for n, _ in files) if total else files
