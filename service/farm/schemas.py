"""The API's documented bodies (pydantic), and how a job's and an artifact's store rows become them.

A Job's fields named like a column of the jobs table are read from the row by those names (the model's own
field list, not a copy of it), so a column added to both shows up without a second edit and a field the
row lacks fails at once; only the grouped fields (progress, timings, artifacts, links) are built here.
"""
from datetime import datetime, timezone

from pydantic import BaseModel


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class Problem(BaseModel):
    detail: str
    errors: list[dict] | None = None


class Health(BaseModel):
    ok: bool
    problems: list[str] = []


class JobProgress(BaseModel):
    layers_done: int
    layers_total: int | None


class Timings(BaseModel):
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    seconds: dict | None


class ArtifactRef(BaseModel):
    id: str
    format: str
    published: bool
    size_bytes: int
    files: str

    @classmethod
    def from_row(cls, art: dict) -> "ArtifactRef":
        """An artifacts row, linked to its file listing."""
        return cls(**{name: art[name] for name in cls.model_fields if name != "files"},
                   files=f"/v1/artifacts/{art['id']}")


class Job(BaseModel):
    id: str
    state: str
    step: str | None
    progress: JobProgress
    model: str
    revision: str | None
    recipe_key: str
    priority: int
    attempt: int
    max_attempts: int
    memory_gb: float
    worker: str | None
    cancel_requested: bool
    error: str | None
    submitted_by: str | None
    timings: Timings
    result: dict | None
    artifacts: list[ArtifactRef]
    spec: dict
    links: dict[str, str]

    @classmethod
    def from_row(cls, job: dict, artifacts: list[dict]) -> "Job":
        """A jobs row with its artifacts rows (Store.get and Store.artifacts_of)."""
        base = f"/v1/jobs/{job['id']}"
        result = job.get("result") or {}
        built = {
            "progress": JobProgress(layers_done=job["layers_done"], layers_total=job["layers_total"]),
            "timings": Timings(created_at=iso(job["created_at"]), started_at=iso(job["started_at"]),
                               finished_at=iso(job["finished_at"]), seconds=result.get("seconds")),
            "result": result or None,
            "artifacts": [ArtifactRef.from_row(a) for a in artifacts],
            "links": {"self": base, "events": f"{base}/events", "logs": f"{base}/logs", "report": f"{base}/report"},
        }
        return cls(**{name: built[name] if name in built else job[name] for name in cls.model_fields})


class JobList(BaseModel):
    jobs: list[Job]
    total: int
    limit: int
    offset: int


class ArtifactFile(BaseModel):
    path: str
    url: str
    size_bytes: int


class ArtifactListing(BaseModel):
    id: str
    job_id: str
    path: str
    format: str
    size_bytes: int
    published: bool
    created_at: float
    files: list[ArtifactFile]
