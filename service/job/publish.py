"""Publishing: copy a finished artifact folder to where a serving stack loads it from.

Targets are `local` (the artifact stays in the local store), `hub` / `hub:ORG` (a Hugging Face Hub repo) or an
fsspec URL (`file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`, ...). An fsspec target gets
`URL/MODEL-REV/NAME/`, written atomically (file://: a temporary folder renamed into place) or manifest last
(object stores), and never overwrites another artifact unless the operator asks: publish_files.py says how, and
what a reader may trust. A Hub upload is one commit, which is atomic already, into a repo whose name holds the
model and the variant (`{org}/{model}-{variant}`).

Why failures are PublishError: publishing runs after the expensive work, so a failed upload must never lose or
touch the local artifact; the message says where it is kept and that publishing again completes the job.
"""
from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ArtifactError, PublishError, SpecError
from service.job.publish_files import (MANIFEST, Upload, artifact_identity, is_published, model_name, name_part,
                                       publish_fsspec, same_recipe, who)
from service.job.storage import is_artifact

__all__ = ["MANIFEST", "Destination", "HubSettings", "is_published", "parse_target", "publish", "publish_each"]

# fsspec protocols that cannot take writes, or that are a transport rather than a place
_NOT_WRITABLE = {"http", "https"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Destination:
    """Where an artifact goes (parse_target's reading of a publish target): kind is "local", "hub" (org None: the
    server's configured org) or "fsspec"; with the credentials for that place, which are the server's (`hub`:
    None reads HubSettings.from_env(); `options`: the fsspec storage options) and not part of its identity."""
    kind: str
    url: str | None = None
    org: str | None = None
    hub: HubSettings | None = field(default=None, compare=False, repr=False)
    options: dict | None = field(default=None, compare=False, repr=False)

    @property
    def protocol(self) -> str | None:
        return self.url.split("://", 1)[0] if self.url else None

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.org}" if self.org else "hub"
        return self.url if self.kind == "fsspec" else "local"


def parse_target(text: str, *, allow_urls: bool) -> Destination:
    """Parse `local`, `hub`, `hub:ORG` or an fsspec URL. allow_urls=False (API submitters, who are not trusted to
    pick destinations) accepts only `local` and `hub`, whose destination the administrator configured."""
    text = (text or "").strip()
    if text in ("", "local"):
        return Destination("local")
    if text == "hub" or text.startswith("hub:"):
        org = text[4:].strip() or None
        if org is not None:
            if not allow_urls:
                raise SpecError(f"publish target {text!r}: naming a Hub org is not allowed here; use 'hub' "
                                "(the org the server is configured with)")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", org):
                raise SpecError(f"publish target {text!r}: {org!r} is not a valid Hub org name")
        return Destination("hub", org=org)
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
    return Destination("fsspec", url=text.rstrip("/"))


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


def hub_repo_id(hub: HubSettings, model: str, variant: str, org: str | None = None) -> str:
    """The repo id the template names for `model` (its last path component) and `variant`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    org = org or hub.org
    if "{model}" not in hub.name_template or "{variant}" not in hub.name_template:
        raise SpecError(f"Hub name template {hub.name_template!r} must contain {{model}} and {{variant}}: without "
                        "them two models, or two variants, would be published to one repo")
    if "{org}" in hub.name_template and not org:
        raise SpecError("Hub publishing needs an org: set QUANTFARM_HUB_ORG, name one as 'hub:ORG', or use a name "
                        "template without {org}")
    try:
        repo_id = hub.name_template.format(org=org, model=name_part(model_name(model)), variant=name_part(variant))
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


def publish(folder, target: Destination | str, *, name: str, model: str | None = None, replace: bool = False) -> dict:
    """Publish the artifact `folder` as `name` to `target` (a string is parsed as trusted configuration, with
    the server's Hub settings and no storage options).
    Returns {"target", "url", "status", "files", "bytes", "commit", "seconds"}, status "published", "replaced"
    or "unchanged" (the same files were there: nothing copied); raises SpecError / ArtifactError for what is
    wrong before any upload, PublishError when the destination holds another artifact (unless `replace`, the
    operator's choice) or the upload fails (the local artifact is never modified)."""
    t0 = time.perf_counter()
    folder = Path(folder).absolute()
    if isinstance(target, str):
        target = parse_target(target, allow_urls=True)
    files = _artifact_files(folder)
    total = sum(p.stat().st_size for _, p in files)
    record = {"target": str(target), "files": len(files), "bytes": total, "commit": None}
    up = Upload(folder, files, name, artifact_identity(folder, model), replace)
    if target.kind == "local":
        record.update(url=folder.as_uri(), status="kept")
    elif target.kind == "hub":
        record.update(_publish_hub(up, target, model or up.identity["source"]))
    else:
        if not _NAME_OK.match(name or "") or ".." in name:
            raise SpecError(f"publish name {name!r}: use letters, digits, '.', '_' and '-' (one path component)")
        record.update(publish_fsspec(up, target.url, target.options or {}))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client this huggingface_hub uses (not all are OSError)."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_occupant(api, repo_id: str) -> dict | None:
    """Whose artifact the repo holds now (artifact_identity of its report.json), None for an empty repo."""
    import tempfile

    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            api.hf_hub_download(repo_id, "report.json", repo_type="model", local_dir=tmp)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        return artifact_identity(Path(tmp))


def _publish_hub(up: Upload, target: Destination, model: str) -> dict:
    """One create_repo and one upload_folder commit; the commit mirrors the folder (delete_patterns="*"), so a
    republish with fewer shards leaves none of the old ones. The repo's name holds the model's last name part
    and the variant, so two sources of one name (org1/llama, org2/llama) can meet in one repo: a repo that holds
    another source's or recipe's artifact is refused unless `replace`. The commit message carries the source's
    revision and the recipe key."""
    folder, name, identity, replace = up.folder, up.name, up.identity, up.replace
    hub = target.hub or HubSettings.from_env()
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
        step = "read what the repo holds"
        there = _hub_occupant(api, repo_id)
        if there is not None and not replace and not same_recipe(there, identity):
            raise PublishError(f"cannot publish {folder} to {repo_id}: it holds another artifact ({who(there)}) "
                               f"than this one ({who(identity)}). The local artifact at {folder} is kept; change "
                               "the server's Hub name template or org, or ask the operator to replace it (quantfarm "
                               "publish --replace, or serve --publish-replace)")
        step = "upload"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=f"quantfarm: publish {name}", delete_patterns="*",
                                 commit_description=f"source {identity['source']} at revision "
                                                    f"{identity['revision']}, recipe {identity['recipe_key']}",
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
            "commit_url": getattr(info, "commit_url", None),
            "status": "published" if there is None else "updated" if same_recipe(there, identity) else "replaced"}


def publish_each(folder, spec, targets: list, on_start=lambda entry: None,
                 replace: bool = False) -> tuple[list, list, str | None]:
    """Publish the artifact of `spec` (a JobSpec) to each (entry, Destination) in turn, `local` skipped (the
    artifact is there already). Returns (records, the entries not published, why): a failure stops at that
    target, so publishing again later goes on from there. `replace` (the operator's setting, never the spec's)
    lets it overwrite another artifact's folder."""
    done = []
    for i, (entry, target) in enumerate(targets):
        if target.kind == "local":
            continue
        on_start(entry)
        try:
            rec = publish(folder, target, name=spec.label(), model=spec.model, replace=replace)
        except (PublishError, SpecError, ArtifactError) as e:
            return done, [x for x, _ in targets[i:]], f"publishing to {entry} failed: {e}"
        done.append({**rec, "entry": entry})
    return done, [], None
