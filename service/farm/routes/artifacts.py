"""/v1/artifacts: an artifact's file listing and its files, from HOME's folders or the storage URL."""
import os
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, StreamingResponse

from core.errors import ArtifactError
from service.job import blobstore

from .. import media
from ..schemas import ArtifactFile, ArtifactListing
from ..store import Store
from .deps import Farm, NotFound, current_farm, errors, resolve_id, role, shown

router = APIRouter(tags=["artifacts"])


class Download(FileResponse):
    """An artifact file with its own media type and headers (media.py): reports shown, weights downloaded."""
    media_type = media.OCTET

    def __init__(self, path, name: str, status_code: int = 200, **kw):
        super().__init__(path, status_code=status_code, media_type=media.media_type(name), headers=media.headers(name),
                         **kw)


def get_artifact(store: Store, artifact_id: str) -> dict:
    art = store.artifact(resolve_id(store, "artifact", artifact_id))
    if art is None:
        raise NotFound(f"no artifact {artifact_id}")
    if not blobstore.is_url(art["path"]) and not Path(art["path"]).is_dir():
        raise ArtifactError(f"artifact {art['id']}'s folder {art['path']} is gone from the artifact store")
    return art


def chunks(f, size: int = 1 << 20):
    with f:
        while chunk := f.read(size):
            yield chunk


def artifact_listing(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of the regular files in an artifact folder; symlinks are neither followed
    nor listed, so no loop or link out of the folder shows up."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink() and p.is_file():
                out.append((str(p.relative_to(root)), p.stat().st_size))
    return sorted(out)


def artifact_path(root: Path, path: str, artifact_id: str) -> Path:
    """The file `path` names inside the artifact folder `root`; 404 for anything else (outside the folder,
    a link out of it, a loop, NUL bytes, over-long names)."""
    missing = NotFound(f"artifact {artifact_id} has no file {shown(path)}")
    if "\x00" in path or len(path) > 1024 or path.count("/") > 32:
        raise missing
    try:
        root = root.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or target == root or not target.is_file():
            raise missing
    except (OSError, RuntimeError, ValueError):
        raise missing from None
    return target


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactListing, responses=errors(404))
def artifact_files(artifact_id: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    art = get_artifact(farm.store, artifact_id)
    aid = art["id"]
    if blobstore.is_url(art["path"]):
        bs, key = blobstore.at(art["path"])
        files = bs.files(key)
    else:
        files = artifact_listing(Path(art["path"]))
    return ArtifactListing(**art, files=[ArtifactFile(path=f, url=f"/v1/artifacts/{aid}/files/{f}", size_bytes=size)
                                         for f, size in files])


@router.get("/v1/artifacts/{artifact_id}/files/{path:path}", response_class=Download,
            responses={200: {"content": media.DOCUMENTED}, **errors(404)})
def artifact_file(artifact_id: str, path: str, _=Depends(role("read")), farm: Farm = Depends(current_farm)):
    art = get_artifact(farm.store, artifact_id)
    if blobstore.is_url(art["path"]):              # streamed from the storage, names checked against its listing
        bs, key = blobstore.at(art["path"])
        if path not in {f for f, _ in bs.files(key)}:
            raise NotFound(f"artifact {art['id']} has no file {shown(path)}")
        return StreamingResponse(chunks(bs.open(key, path)), media_type=media.media_type(path),
                                 headers=media.headers(path))
    return Download(artifact_path(Path(art["path"]), path, art["id"]), path)
