"""Checks on where results go, made before any work: a job that cannot write its artifact should fail
in its first second, naming the path and the numbers, not after an hour of quantization."""
import os
import shutil
import uuid
from pathlib import Path

from core.errors import StorageError

MARGIN = 1.10            # the artifact is written into a sibling temp folder first: same file system


def nearest_existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(folder) -> Path:
    """Refuse a folder that cannot be created or written (read-only mount, immutable or foreign folder);
    returns the existing ancestor that was probed. The probe is a temp folder, removed at once."""
    folder = Path(folder).absolute()
    base = nearest_existing(folder.parent if folder.exists() else folder)
    if not base.is_dir():
        raise StorageError(f"cannot write {folder}: {base} is a file, not a folder")
    probe = base / f".quantfarm-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        (probe / "x").write_bytes(b"")
    except OSError as e:
        raise StorageError(f"cannot write {folder}: creating a file under {base} failed ({e.strerror or e}); "
                           "choose another --out or fix the folder's permissions") from e
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return base


def check_space(folder, need_bytes: int) -> None:
    """Refuse when the file system holding `folder` has less free space than `need_bytes` (plus a margin)."""
    base = nearest_existing(Path(folder))
    free = shutil.disk_usage(base).free
    need = int(need_bytes * MARGIN)
    if free < need:
        raise StorageError(f"not enough space for {folder}: about {need / 2 ** 20:.0f} MiB needed, "
                           f"{free / 2 ** 20:.0f} MiB free on the file system of {base}")


def is_artifact(folder) -> bool:
    """A folder quantfarm wrote: its config names quantfarm as the quantizer, or it holds a report.json."""
    import json
    folder = Path(folder)
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        qc = {}
    quantizer = (qc.get("meta") or {}).get("quantizer") or []
    return any(str(q).startswith("quantfarm:") for q in quantizer) or (folder / "report.json").is_file()


def check_replaceable(folder, overwrite: bool) -> None:
    """An existing output is replaced only with overwrite, and only when it is a quantfarm artifact."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not overwrite:
        raise StorageError(f"{folder} already exists; choose another --out, or pass --overwrite to replace "
                           "an artifact quantfarm wrote there")
    if not folder.is_dir() or not is_artifact(folder):
        raise StorageError(f"{folder} exists and is not a quantfarm artifact, so --overwrite will not replace it "
                           "(nothing was deleted); choose another --out")
    if not os.access(folder.parent, os.W_OK):
        raise StorageError(f"cannot replace {folder}: its parent folder is not writable")
