"""Where quantfarm keeps derived data any process may rebuild: QUANTFARM_CACHE, default ~/.cache/quantfarm
(the fp16 copies of GGUF sources, llama.cpp's tools, GGUF conversions and importance matrices)."""
import os
import shutil
import threading
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("QUANTFARM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "quantfarm"
    return Path(base).expanduser()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a small file under a temporary name unique to this process and thread, then rename it into place:
    readers see the old file or the whole new one, and concurrent writers of the same file do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def swap_folder(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest` (same directory, so same filesystem) by renames: a reader sees
    the old folder or the whole new one, never a mix. An old `dest` is renamed aside first, then deleted; if
    the second rename fails the old one is put back."""
    new, dest = Path(new), Path(dest)
    aside = None
    if dest.exists() or dest.is_symlink():
        aside = dest.with_name(f".{dest.name}.old-{os.getpid()}-{threading.get_ident()}")
        os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        if aside is not None:
            os.rename(aside, dest)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
