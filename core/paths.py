"""Where quantfarm keeps derived data any process may rebuild: QUANTFARM_CACHE, default ~/.cache/quantfarm
(the fp16 copies of GGUF sources, llama.cpp's tools, GGUF conversions and importance matrices); and the one way
its files and folders are put in place, whole or not at all."""
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("QUANTFARM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "quantfarm"
    return Path(base).expanduser()


@contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` for a writer that makes the file itself (safetensors, a llama.cpp program),
    renamed onto `dest` when the block succeeds and removed when it raises: readers see the old file or the
    whole new one. The name is hidden and unique to this process and thread, so concurrent writers of the same
    file do not collide; it keeps no suffix of `dest`'s, so no `*.json`-like listing of the folder meets it."""
    tmp = _hidden(dest, "tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _hidden(dest: Path, kind: str) -> Path:
    """A hidden sibling of `dest` unique to this process and thread, with no suffix of `dest`'s."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}-{threading.get_ident()}")


def work_folder(dest: Path) -> Path:
    """A fresh empty hidden folder beside `dest` (parents made), for work that becomes `dest` later by
    swap_folder; atomic_folder when one block does both."""
    tmp = _hidden(dest, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)              # a killed process's, that had this process's id
    tmp.mkdir(parents=True)
    return tmp


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a small file whole or not at all (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())


@contextmanager
def atomic_folder(dest: Path, *, replace: bool = False, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh empty folder beside `dest` (a hidden sibling unique to this process and thread, parents made) to
    fill; when the block succeeds it becomes `dest` by a rename, so a crash, a cancel or a reader never meets a
    half folder at `dest`; when the block raises it is removed. An existing `dest`: `replace` swaps it out
    whole (swap_folder); otherwise the rename fails as os.rename does (OSError: a non-empty `dest`), unless
    `keep(dest)` says the folder there is complete (another process made the same thing), which is then kept
    and ours dropped."""
    dest = Path(dest)
    tmp = work_folder(dest)
    try:
        yield tmp
        if replace:
            swap_folder(tmp, dest)
        else:
            try:
                os.rename(tmp, dest)
            except OSError:
                if keep is None or not keep(dest):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_folder(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest` (same directory, so same filesystem) by renames: a reader sees
    the old folder or the whole new one, never a mix. An old `dest` is renamed aside first, then deleted; if
    the second rename fails the old one is put back."""
    new, dest = Path(new), Path(dest)
    aside = None
    if dest.exists() or dest.is_symlink():
        aside = _hidden(dest, "old")
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
