"""A farm's storage named by URL (fsspec: file:// for one machine or a mounted share, s3:// for a cluster):
where per-layer resume state and finished artifacts live when the workers do not share one disk. A worker
computes in a local scratch folder and mirrors it here; the API reads artifacts from here.

Layout under the URL: state/JOB/ (a job's per-layer state: layer files first, manifest.json last, so a
manifest seen names layers that are all there) and artifacts/JOB/ (the finished artifact's files).
"""
from pathlib import Path

MANIFEST = "manifest.json"


def is_url(path: str) -> bool:
    return "://" in str(path)


class BlobStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))

    def check(self) -> None:
        """Write, read back and remove a probe: a storage the farm cannot use fails at start, not mid-job."""
        from core.errors import StorageError
        probe = self._path(".probe")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            ok = self.fs.cat_file(probe) == b"ok"
            self.fs.rm(probe)
        except Exception as e:
            raise StorageError(f"storage {self.url} is not usable: {type(e).__name__}: {e}") from None
        if not ok:
            raise StorageError(f"storage {self.url} did not give back what was written to it")

    def where(self, key: str) -> str:
        """The URL of `key` (e.g. artifacts/JOB)."""
        return f"{self.url}/{key}"

    def _path(self, key: str, rel: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), key.strip("/"), rel) if p)

    def put(self, local: Path, key: str, names: list[str] | None = None) -> None:
        """Copy files of the folder `local` (all, or `names` in that order) under `key`."""
        local = Path(local)
        names = names if names is not None else sorted(str(p.relative_to(local)) for p in local.rglob("*")
                                                       if p.is_file() and not p.is_symlink())
        for name in names:
            dest = self._path(key, name)
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local / name), dest)

    def get(self, key: str, local: Path) -> list[str]:
        """Copy every file under `key` into the folder `local` (the manifest last); the names copied."""
        names = [rel for rel, _ in self.files(key)]
        names.sort(key=lambda n: n == MANIFEST)
        for name in names:
            (Path(local) / name).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(key, name), str(Path(local) / name))
        return names

    def files(self, key: str) -> list[tuple[str, int]]:
        """(relative path, size) of the files under `key`; empty when there are none."""
        base = self._path(key)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted((p[len(base):].lstrip("/"), int(d.get("size") or 0)) for p, d in found.items()
                      if d.get("type") != "directory")

    def read_bytes(self, key: str, rel: str) -> bytes:
        return self.fs.cat_file(self._path(key, rel))

    def open(self, key: str, rel: str):
        return self.fs.open(self._path(key, rel), "rb")

    def remove(self, key: str) -> None:
        try:
            self.fs.rm(self._path(key), recursive=True)
        except FileNotFoundError:
            pass


def at(url: str) -> tuple[BlobStore, str]:
    """(the store, the key) of a stored artifact's URL: STORE/artifacts/JOB."""
    base, _, job = url.rstrip("/").rpartition("/artifacts/")
    return BlobStore(base), f"artifacts/{job}"


def read_report(path: str | None) -> dict | None:
    """An artifact's report.json, from a folder or a stored artifact's URL; None when it has none."""
    import json
    if not path:
        return None
    try:
        if is_url(path):
            store, key = at(path)
            return json.loads(store.read_bytes(key, "report.json"))
        p = Path(path) / "report.json"
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None
