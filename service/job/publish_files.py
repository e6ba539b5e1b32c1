"""Publishing to an fsspec URL (file://, s3://, gs://, sftp://, ...): where an artifact goes, its manifest, the
copy, and the one check a reader may trust (is_published).

Where: `URL/MODEL-REV/NAME`. MODEL is the source's last path component, REV the first 12 hex digits of its pinned
revision (a Hub commit, the content hash of a local folder, a merge's key), NAME the job's label (gptq-w4-g128,
a release's variant). Two models published with the same settings therefore never share a folder; a release's
variants share MODEL-REV. The manifest records whose artifact a folder holds: source, revision, recipe key.

Who may overwrite what: the same files again are a no-op (reported "unchanged"); a rebuild of the same recipe
(same recipe key, other bytes) replaces its folder; a folder holding another recipe's artifact, or on file://
anything that is not a quantfarm publication, is refused with PublishError unless the operator asked to replace
(`quantfarm publish --replace`, `serve --publish-replace`; a job spec cannot ask).

Why a manifest: `quantfarm-manifest.json` (identity, names, sizes, sha256) is written last, and "published" means
that manifest is there, well formed, and every file it lists is there with its size. Readers trust nothing else:
  - file:// (a filesystem with rename): the whole folder, manifest included, is written under a hidden temporary
    sibling name (`.NAME.publishing-...`) and renamed into place; a replace renames the old folder aside, the new
    one in, then deletes the old. A reader sees no folder, the old complete one, or the new complete one.
  - object stores and other fsspec filesystems (no atomic folder rename): the files go up first and the manifest
    last; a replace removes the old manifest before its first file. There a folder without its manifest is an
    upload in progress or an interrupted one (publishing again completes it), never an artifact.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.errors import PublishError, QuantfarmError, SpecError
from core.paths import swap_folder

MANIFEST = "quantfarm-manifest.json"
FORMAT = "quantfarm-manifest/2"
# object stores: "mkdir" is a no-op for prefixes and may *create a bucket*, so it is never called on them
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss"}


def model_name(source: str) -> str:
    """The readable part of a source's name: its last path component, less an @revision or .gguf suffix."""
    last = str(source).rstrip("/").split("/")[-1]
    return last.split("@", 1)[0].removesuffix(".gguf") or last


def name_part(text: str, limit: int | None = None) -> str:
    """A name part that is safe as a folder and legal on the Hub: [A-Za-z0-9._-], no '--' or '..', starting and
    ending with a letter or digit; at most `limit` characters."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    return re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", text)).strip("-._")[:limit].strip("-._")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def artifact_identity(folder: Path, model: str | None = None) -> dict:
    """Whose artifact `folder` is: {"source", "revision", "recipe_key"} from its report.json, else from its
    quantization_config's meta; `model` (the job's) when neither names the source."""
    folder = Path(folder)
    report = read_json(folder / "report.json")
    meta = (read_json(folder / "config.json").get("quantization_config") or {}).get("meta") or {}
    source = report.get("model") or (report.get("spec") or {}).get("model") or model or meta.get("source_model")
    return {"source": str(source or folder.name), "revision": report.get("revision") or meta.get("source_revision"),
            "recipe_key": report.get("recipe_key") or meta.get("recipe_hash")}


def published_dir(identity: dict, entries: list[dict]) -> str:
    """MODEL-REV for an identity; REV from the revision, else the recipe key, else the files' hashes."""
    rev = identity.get("revision") or identity.get("recipe_key") or \
        hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    rev = str(rev)
    hexed = re.fullmatch(r"[0-9A-Fa-f]{12,}", rev)
    short = rev[:12].lower() if hexed else hashlib.sha256(rev.encode()).hexdigest()[:12]
    return f"{name_part(model_name(identity['source']), 64) or 'model'}-{short}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def filesystem(url: str, storage_options: dict):
    """(fs, path) for url; a missing package or bad storage options is a SpecError (nothing was written)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:
        raise SpecError(f"cannot publish to {url}: the {protocol}:// filesystem is not installed ({e})") from e
    except (TypeError, ValueError) as e:
        raise SpecError(f"cannot publish to {url}: invalid storage options ({e})") from e


@dataclass(frozen=True)
class Upload:
    """One artifact going out: its folder and files (relative name, path), the name it is published as, whose
    artifact it is (artifact_identity: what a manifest or a commit records), and whether another artifact
    found where it goes may be replaced (the operator's choice, never a submitter's)."""
    folder: Path
    files: list
    name: str
    identity: dict
    replace: bool = False


def publish_fsspec(up: Upload, url: str, storage_options: dict) -> dict:
    """Copy the upload's files to URL/MODEL-REV/NAME. Returns {"url", "status"}, status "published",
    "replaced" or "unchanged"; PublishError when the folder there holds another artifact (and not `replace`)
    or when the copy fails (nothing there is then marked published by a manifest of ours)."""
    from fsspec.implementations.local import LocalFileSystem

    folder, files, name, identity = up.folder, up.files, up.name, up.identity
    fs, root = filesystem(url, storage_options)
    entries = [{"path": rel, "size": p.stat().st_size, "sha256": sha256(p)} for rel, p in files]
    where = f"{published_dir(identity, entries)}/{name}"
    dest = f"{root.rstrip('/')}/{where}"
    dest_url = fs.unstrip_protocol(dest)
    manifest = {"format": FORMAT, "name": name, "path": where, **identity,
                "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": entries}
    local = isinstance(fs, LocalFileSystem)
    done: list[str] = []

    def verdict():
        return _verdict(fs, dest, up, entries)

    try:
        status, old = verdict()
        if status != "unchanged":
            if local:
                status = _copy_local(fs, files, Path(dest), manifest, verdict, done)
            else:
                _copy_objects(fs, files, dest, manifest, old, done)
    except QuantfarmError:
        raise
    except Exception as e:  # any backend's error (OSError, botocore, gcsfs, ...): reported the same way
        state = ("nothing changed there (the copy went to a temporary folder, now removed)" if local else
                 "it is not marked published (no manifest there)")
        raise PublishError(f"publishing {folder} to {dest_url} failed after {len(done)} of {len(files)} files "
                           f"({type(e).__name__}: {e}); {state}. The local artifact at {folder} is intact; publish "
                           "again to retry") from e
    return {"url": dest_url, "status": status}


def _verdict(fs, dest: str, up: Upload, entries: list) -> tuple[str, dict | None]:
    """(status, the manifest there): "published" (nothing there), "unchanged" (these files, complete),
    "replaced" (the same recipe rebuilt, or `replace`); another artifact's folder is refused."""
    from fsspec.implementations.local import LocalFileSystem

    folder, identity, replace = up.folder, up.identity, up.replace
    dest_url, local = fs.unstrip_protocol(dest), isinstance(fs, LocalFileSystem)
    old = _read_manifest(fs, dest)
    how = (f"Publish it under another name (--name, a spec's `name`), or replace that folder on purpose: "
           f"`quantfarm publish {folder} --to TARGET --replace`, or on a farm the server's `serve --publish-replace`")
    if old is None:
        if local and fs.exists(dest):      # this code never leaves a folder without its manifest on file://
            if replace:
                return "replaced", None
            raise PublishError(f"{dest_url} exists and is not a quantfarm publication (no {MANIFEST}); nothing was "
                               f"written and the local artifact at {folder} is kept. {how}")
        return "published", None          # object stores: nothing there, or an interrupted upload to complete
    if valid_manifest(old) and _file_set(old["files"]) == _file_set(entries) and _complete(fs, dest, old):
        return "unchanged", old
    if (valid_manifest(old) and same_recipe(old, identity)) or replace:
        return "replaced", old
    raise PublishError(f"{dest_url} holds another artifact ({who(old)}) than {folder} ({who(identity)}); nothing "
                       f"was written and the local artifact is kept. {how}")


def same_recipe(there: dict, identity: dict) -> bool:
    """Whether what a destination holds (its manifest or report identity) is a build of this recipe of this
    source: then a publish may update it; anything else needs the operator's replace."""
    return (identity.get("recipe_key") is not None and there.get("recipe_key") == identity["recipe_key"]
            and all(there.get(k, identity[k]) == identity[k] for k in ("source", "revision")))


def who(m: dict) -> str:
    """Whose artifact a manifest or identity describes, in one line."""
    return (f"{m.get('source') or 'unknown source'} at revision {str(m.get('revision') or '?')[:12]}, "
            f"recipe {str(m.get('recipe_key') or '?')[:12]}")


def _file_set(entries: list) -> set:
    return {(e.get("path"), e.get("size"), e.get("sha256")) for e in entries if isinstance(e, dict)}


def _dump(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def _copy_local(fs, files, dest: Path, manifest: dict, verdict, done: list) -> str:
    """The whole folder under a hidden temporary sibling name, then renamed into place (swap_folder)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.publishing-{uuid.uuid4().hex[:12]}")
    try:
        tmp.mkdir()
        for rel, p in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.put_file(str(p), str(tmp / rel))
            done.append(rel)
        (tmp / MANIFEST).write_bytes(_dump(manifest))
        with _locked(dest.parent):         # a concurrent publisher of this folder: decided again, one at a time
            status, _ = verdict()
            if status != "unchanged":
                swap_folder(tmp, dest)
        return status
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _locked(folder: Path):
    """An exclusive flock on the folder; where the filesystem has none (some network mounts) the verdict
    is still taken again just before the rename."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _copy_objects(fs, files, dest: str, manifest: dict, old: dict | None, done: list) -> None:
    """Files first, the manifest last; an old manifest goes before the first file."""
    if old is not None:
        fs.rm_file(f"{dest}/{MANIFEST}")  # a reader must never pair the old manifest with new files
    makedirs = not (set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & OBJECT_STORES)
    for rel, p in files:
        if makedirs:
            fs.makedirs(f"{dest}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(p), f"{dest}/{rel}")
        done.append(rel)
    # files of the previous publish that this artifact does not have (an old shard would be loaded beside the
    # new ones); only files our own manifest listed are removed, never anything else under dest
    stale = {e.get("path") for e in (old or {}).get("files", []) if isinstance(e, dict)} - {rel for rel, _ in files}
    for rel in sorted(p for p in stale if isinstance(p, str) and ".." not in p.split("/")):
        if fs.exists(f"{dest}/{rel}"):
            fs.rm_file(f"{dest}/{rel}")
    fs.pipe_file(f"{dest}/{MANIFEST}", _dump(manifest))


def _read_manifest(fs, dest: str) -> dict | None:
    try:
        manifest = json.loads(fs.cat_file(f"{dest}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}                          # there but unreadable: not a manifest a reader may trust
    return manifest if isinstance(manifest, dict) else {}


def valid_manifest(m) -> bool:
    """A quantfarm manifest listing at least one file, each with a relative path, a size and a sha256."""
    if not isinstance(m, dict) or not str(m.get("format", "")).startswith("quantfarm-manifest/"):
        return False
    files = m.get("files")
    return isinstance(files, list) and bool(files) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"] and not e["path"].startswith("/")
        and ".." not in e["path"].split("/") and isinstance(e.get("size"), int) and e["size"] >= 0
        and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) for e in files)


def _complete(fs, dest: str, manifest: dict) -> bool:
    sizes = {fs._strip_protocol(k).rstrip("/"): v.get("size") for k, v in fs.find(dest, detail=True).items()}
    return all(sizes.get(f"{dest}/{e['path']}") == e["size"] for e in manifest["files"])


def is_published(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest at a published folder's URL (`TARGET/MODEL-REV/NAME`, the URL a job's record gives) when it
    is complete: a well-formed quantfarm manifest, and every file it lists there with its size; None otherwise.
    This is the check to trust before loading a published folder (a folder without its manifest on an object
    store is an upload in progress). An error other than "not found" (network, permission) raises PublishError:
    a check that could not look must not answer "not published"."""
    fs, dest = filesystem(url.rstrip("/"), storage_options or {})
    dest = dest.rstrip("/")
    try:
        manifest = _read_manifest(fs, dest)
        if not valid_manifest(manifest) or not _complete(fs, dest, manifest):
            return None
    except FileNotFoundError:
        return None
    except Exception as e:
        raise PublishError(f"cannot check {url} ({type(e).__name__}: {e})") from e
    return manifest
