"""Publishing: copy a finished artifact folder to where a serving stack loads it from.

Targets are `local` (the artifact stays in the local store), `hub` / `hub:ORG` (a Hugging Face Hub repo) or an
fsspec URL (`file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`, ...).

Why a manifest: object stores have no atomic folder rename, so a reader could see half an upload. Files go up
first and `quantfarm-manifest.json` (names, sizes, sha256) last; "published" means that manifest is there and
every file it lists has its size. A Hub upload is one commit, which is atomic already, so it needs none.

Why failures are PublishError: publishing runs after the expensive work, so a failed upload must never lose or
touch the local artifact; the message says where it is kept and that publishing again completes the job.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.errors import ArtifactError, PublishError, SpecError
from service.job.storage import is_artifact

__all__ = ["MANIFEST", "HubSettings", "Target", "is_published", "parse_target", "publish"]

MANIFEST = "quantfarm-manifest.json"
# object stores: "mkdir" is a no-op for prefixes and may *create a bucket*, so it is never called on them
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss"}
# fsspec protocols that cannot take writes, or that are a transport rather than a place
_NOT_WRITABLE = {"http", "https"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Target:
    """Where an artifact goes: kind is "local", "hub" (org None: the server's configured org) or "fsspec"."""
    kind: str
    url: str | None = None
    org: str | None = None

    @property
    def protocol(self) -> str | None:
        return self.url.split("://", 1)[0] if self.url else None

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.org}" if self.org else "hub"
        return self.url if self.kind == "fsspec" else "local"


def parse_target(text: str, *, allow_urls: bool) -> Target:
    """Parse `local`, `hub`, `hub:ORG` or an fsspec URL. allow_urls=False (API submitters, who are not trusted to
    pick destinations) accepts only `local` and `hub`, whose destination the administrator configured."""
    text = (text or "").strip()
    if text in ("", "local"):
        return Target("local")
    if text == "hub" or text.startswith("hub:"):
        org = text[4:].strip() or None
        if org is not None:
            if not allow_urls:
                raise SpecError(f"publish target {text!r}: naming a Hub org is not allowed here; use 'hub' "
                                "(the org the server is configured with)")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", org):
                raise SpecError(f"publish target {text!r}: {org!r} is not a valid Hub org name")
        return Target("hub", org=org)
    if "://" not in text:
        raise SpecError(f"unknown publish target {text!r}: use 'local', 'hub', 'hub:ORG' or a URL such as "
                        "file:///abs/path or s3://bucket/prefix")
    if not allow_urls:
        raise SpecError(f"publish target {text!r}: URLs are not accepted from job submissions; name 'local' or "
                        "'hub', or ask the administrator to publish there")
    protocol, rest = text.split("://", 1)
    if "::" in protocol:
        raise SpecError(f"publish target {text!r}: chained fsspec URLs are not supported; give one plain URL")
    _check_protocol(protocol, text)
    if protocol == "file" and not rest.startswith("/"):
        raise SpecError(f"publish target {text!r}: a file URL needs an absolute path (file:///abs/path)")
    if not rest.strip("/"):
        raise SpecError(f"publish target {text!r} names no bucket or folder")
    return Target("fsspec", url=text.rstrip("/"))


def _check_protocol(protocol: str, text: str) -> None:
    """Known to fsspec, writable, and its package installed (found without importing it: parsing is cheap)."""
    import fsspec
    from fsspec.registry import known_implementations, registry

    if protocol in _NOT_WRITABLE:
        raise SpecError(f"publish target {text!r}: fsspec's {protocol} filesystem is read-only")
    if protocol in registry:
        return
    if protocol not in fsspec.available_protocols():
        raise SpecError(f"publish target {text!r}: unknown protocol {protocol!r}; fsspec writes to e.g. file://, "
                        "s3:// (package s3fs), gs:// (gcsfs), az:// (adlfs), sftp:// (paramiko)")
    package = known_implementations[protocol]["class"].split(".")[0]
    if importlib.util.find_spec(package) is None:
        raise SpecError(f"publish target {text!r}: the {protocol}:// protocol needs the Python package "
                        f"{package!r}, which is not installed; `pip install {package}` on the server")


@dataclass(frozen=True)
class HubSettings:
    """The server's Hub account. It comes from the server's configuration (`from_env`), never from a job spec:
    a submitter who could set the token or endpoint could publish with the server's credentials anywhere."""
    token: str | None = None
    endpoint: str | None = None
    org: str | None = None
    private: bool = True
    name_template: str = "{org}/{model}-{variant}"

    @classmethod
    def from_env(cls, environ=None) -> HubSettings:
        env = os.environ if environ is None else environ
        return cls(token=env.get("HF_TOKEN") or None, endpoint=(env.get("HF_ENDPOINT") or "").rstrip("/") or None,
                   org=env.get("QUANTFARM_HUB_ORG") or None)


def _hub_part(text: str) -> str:
    """Hub-legal name part: [A-Za-z0-9._-], no '--' or '..', no leading or trailing '-' or '.'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", text))
    return text.strip("-.")


def hub_repo_id(hub: HubSettings, model: str, variant: str, org: str | None = None) -> str:
    """The repo id the template names for `model` (its last path component) and `variant`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    org = org or hub.org
    if "{org}" in hub.name_template and not org:
        raise SpecError("Hub publishing needs an org: set QUANTFARM_HUB_ORG, name one as 'hub:ORG', or use a name "
                        "template without {org}")
    try:
        repo_id = hub.name_template.format(org=org, model=_hub_part(model.rstrip("/").split("/")[-1]),
                                           variant=_hub_part(variant))
    except (KeyError, IndexError, ValueError) as e:
        raise SpecError(f"Hub name template {hub.name_template!r} is invalid ({e}); it may use {{org}}, "
                        "{model} and {variant}") from e
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SpecError(f"Hub repo id {repo_id!r} (from template {hub.name_template!r}) is invalid: {e}") from e
    return repo_id


def _artifact_files(folder: Path) -> list[tuple[str, Path]]:
    """(posix relative path, file) of every regular file, sorted; refuses a folder that is not an artifact."""
    if not folder.is_dir():
        raise ArtifactError(f"cannot publish {folder}: no such folder")
    weights = (folder / "config.json").is_file() or any(folder.glob("*.gguf"))
    if not weights or not is_artifact(folder):
        raise ArtifactError(f"cannot publish {folder}: not a quantfarm artifact (config.json or GGUF files, and "
                            "report.json or quantfarm's quantization_config, are missing)")
    files = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.is_symlink()]
    return [(rel, p) for rel, p in files if rel != MANIFEST]


def _report(folder: Path) -> dict:
    try:
        return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def _source_model(folder: Path) -> str:
    spec_model = (_report(folder).get("spec") or {}).get("model")
    if spec_model:
        return str(spec_model)
    try:
        meta = (json.loads((folder / "config.json").read_text()).get("quantization_config") or {}).get("meta") or {}
    except (OSError, ValueError):
        meta = {}
    return str(meta.get("source_model") or folder.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def publish(folder, target: Target | str, *, name: str, hub: HubSettings | None = None,
            storage_options: dict | None = None, model: str | None = None) -> dict:
    """Publish the artifact `folder` as `name` to `target` (a string is parsed as trusted configuration).
    Returns {"target", "url", "files", "bytes", "commit", "seconds"}; raises SpecError / ArtifactError for what is
    wrong before any upload, PublishError when the upload fails (the local artifact is never modified)."""
    t0 = time.perf_counter()
    folder = Path(folder).absolute()
    if isinstance(target, str):
        target = parse_target(target, allow_urls=True)
    files = _artifact_files(folder)
    total = sum(p.stat().st_size for _, p in files)
    record = {"target": str(target), "files": len(files), "bytes": total, "commit": None}
    if target.kind == "local":
        record["url"] = folder.as_uri()
    elif target.kind == "hub":
        record.update(_publish_hub(folder, target, name, hub, model or _source_model(folder)))
    else:
        if not _NAME_OK.match(name or "") or ".." in name:
            raise SpecError(f"publish name {name!r}: use letters, digits, '.', '_' and '-' (one path component)")
        record["url"] = _publish_fsspec(folder, files, target, name, storage_options or {})
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _filesystem(url: str, storage_options: dict):
    """(fs, path) for url; a missing package or bad storage options is a SpecError (nothing was written)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:
        raise SpecError(f"cannot publish to {url}: the {protocol}:// filesystem is not installed ({e})") from e
    except (TypeError, ValueError) as e:
        raise SpecError(f"cannot publish to {url}: invalid storage options ({e})") from e


def _publish_fsspec(folder: Path, files: list[tuple[str, Path]], target: Target, name: str,
                    storage_options: dict) -> str:
    fs, root = _filesystem(target.url, storage_options)
    dest = f"{root.rstrip('/')}/{name}"
    url = fs.unstrip_protocol(dest)
    entries = [{"path": rel, "size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in files]
    local = not (set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & _OBJECT_STORES)
    done = 0
    try:
        old = _read_manifest(fs, dest)
        if old is not None:
            fs.rm_file(f"{dest}/{MANIFEST}")     # first: a reader must never pair an old manifest with new files
        for rel, p in files:
            if local:
                fs.makedirs(f"{dest}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(p), f"{dest}/{rel}")
            done += 1
        # files of the previous publish that this artifact does not have (an old shard would be loaded beside
        # the new ones); only files our own manifest listed are removed, never anything else under dest
        stale = {e.get("path") for e in (old or {}).get("files", [])} - {rel for rel, _ in files}
        for rel in sorted(p for p in stale if isinstance(p, str) and ".." not in p.split("/")):
            if fs.exists(f"{dest}/{rel}"):
                fs.rm_file(f"{dest}/{rel}")
        manifest = {"format": "quantfarm-manifest/1", "name": name, "recipe_key": _report(folder).get("recipe_key"),
                    "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": entries}
        fs.pipe_file(f"{dest}/{MANIFEST}", (json.dumps(manifest, indent=1) + "\n").encode())
    except Exception as e:  # any backend's error (OSError, botocore, gcsfs, ...): reported the same way
        raise PublishError(f"publishing {folder} to {url} failed after {done} of {len(files)} files "
                           f"({type(e).__name__}: {e}); it is not marked published (no manifest there). The local "
                           f"artifact at {folder} is intact; publish again to retry") from e
    return url


def _read_manifest(fs, dest: str) -> dict | None:
    try:
        manifest = json.loads(fs.cat_file(f"{dest}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}                          # unreadable: still ours to replace
    return manifest if isinstance(manifest, dict) else {}


def is_published(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest at the artifact's URL (`{target}/{name}`) when it is there and every file it lists exists with
    its size; None otherwise. An error other than "not found" (network, permission) raises PublishError: a check
    that could not look must not answer "not published"."""
    fs, dest = _filesystem(url.rstrip("/"), storage_options or {})
    dest = dest.rstrip("/")
    try:
        manifest = _read_manifest(fs, dest)
        if not manifest or not isinstance(manifest.get("files"), list):
            return None
        sizes = {fs._strip_protocol(k).rstrip("/"): v.get("size") for k, v in fs.find(dest, detail=True).items()}
    except FileNotFoundError:
        return None
    except Exception as e:
        raise PublishError(f"cannot check {url} ({type(e).__name__}: {e})") from e
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or sizes.get(f"{dest}/{entry.get('path')}") != entry.get("size"):
            return None
    return manifest


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client this huggingface_hub uses (not all are OSError)."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _publish_hub(folder: Path, target: Target, name: str, hub: HubSettings | None, model: str) -> dict:
    """One create_repo and one upload_folder commit; the commit mirrors the folder (delete_patterns="*"), so a
    republish with fewer shards leaves none of the old ones."""
    hub = hub or HubSettings()
    if not hub.token:
        raise SpecError("Hub publishing needs a token: set HF_TOKEN on the server (a token with write access)")
    repo_id = hub_repo_id(hub, model, name, target.org)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = hub.endpoint or "the Hugging Face Hub"
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise PublishError(f"cannot publish {folder} to {repo_id}: Hub offline mode is on (HF_HUB_OFFLINE). The local "
                           f"artifact at {folder} is kept; unset it on the server and publish again")
    step = "create repo"
    try:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        repo = api.create_repo(repo_id, private=hub.private, exist_ok=True, repo_type="model")
        step = "upload"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=f"quantfarm: publish {name}", delete_patterns="*",
                                 ignore_patterns=[MANIFEST])
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = {401: "the token was refused (HTTP 401): check HF_TOKEN",
               403: f"the token may not write to {repo_id.split('/')[0]} (HTTP 403)"}.get(status, f"HTTP {status}")
        raise PublishError(f"publishing {folder} to {repo_id} at {endpoint} failed ({step}: {why}; "
                           f"{(str(e).splitlines() or [''])[0]}). The local artifact at {folder} is kept; "
                           "publish again to retry") from e
    except _transport_errors() as e:
        raise PublishError(f"publishing {folder} to {repo_id} failed: cannot reach {endpoint} ({step}: "
                           f"{type(e).__name__}: {e}). The local artifact at {folder} is kept; publish again "
                           "when the Hub is reachable") from e
    return {"url": str(getattr(repo, "url", repo)), "commit": getattr(info, "oid", None),
            "commit_url": getattr(info, "commit_url", None)}


def publish_each(folder, spec, targets: list, on_start=lambda entry: None) -> tuple[list, list, str | None]:
    """Publish the artifact of `spec` (a JobSpec) to each (entry, Target) in turn, `local` skipped (the
    artifact is there already). Returns (records, the entries not published, why): a failure stops at that
    target, so publishing again later goes on from there."""
    done = []
    for i, (entry, target) in enumerate(targets):
        if target.kind == "local":
            continue
        on_start(entry)
        try:
            rec = publish(folder, target, name=spec.label(), hub=HubSettings.from_env(), model=spec.model)
        except (PublishError, SpecError, ArtifactError) as e:
            return done, [x for x, _ in targets[i:]], f"publishing to {entry} failed: {e}"
        done.append({**rec, "entry": entry})
    return done, [], None
