"""What a submission must pass before it is queued: the server's policy (remote code, pickle, local
files), the same format preflight as `quantize` on the model's Linear shapes, the memory budget of the
largest worker, and room for the artifact. A job refused here costs the submitter a second, not a
worker's hour.

Model facts (Linear shapes, widths, sizes) come from the model's config alone (service/job/facts.py): a Hub
model is resolved to its commit with its config, tokenizer and index files, never its weights.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

# imported when the app is created, never lazily on a request thread: concurrent first imports of
# transformers' and huggingface_hub's lazy modules are what lost submissions to a cold server
from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache  # noqa: F401
from huggingface_hub import errors as hub_errors  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

from core.errors import SpecError
from quantizers import estimates
from service.job import storage
from service.job.context import JobContext
from service.job.facts import ModelFacts, model_facts
from service.job import merge_recipe
from service.job.merge import resolve_source
from service.job.models import resolve_model
from service.job.sources import ResolvedModel
from service.job.pipeline import maker_of
from service.job.spec import JobSpec

from .policy import Policy, check_paths, check_publish, check_trust

log = logging.getLogger("quantfarm.api")


def memory_estimate_gb(facts: ModelFacts | None, spec: JobSpec) -> float:
    """Device memory the job's layer walk needs (quantizers/estimates.py); 0 when the shapes are unknown."""
    if facts is None:
        return 0.0
    return estimates.device_memory_gb(facts.hidden, facts.intermediate, spec.calibration.samples * spec.calibration.seq_len)


@dataclass
class Admitted:
    source: ResolvedModel
    revision: str
    memory_gb: float


def pin(spec, *, admin: bool, policy: Policy) -> ResolvedModel:
    """The server's policy on the spec's source, then the source resolved (a Hub revision to its commit, a
    local model to its content hash, a merge recipe to the hash of the recipe and its sources' revisions).
    `spec`: a JobSpec or a ReleaseSpec."""
    check_trust(spec, policy, admin)
    check_paths(spec, policy)
    check_publish(spec, policy, admin)
    # config and index files only: the weights (and a merge) are the worker's, after its own checks
    return resolve_source(spec, local_roots=list(policy.model_roots), build_merge=False, weights=False)


def admit(spec: JobSpec, *, admin: bool, policy: Policy, artifact_root: Path,
          worker_memory_gb: float | None, src: ResolvedModel | None = None) -> Admitted:
    """Every check a job passes before it is queued; raises the first that fails (4xx or 507). `src`: the
    source already pinned for this spec (a release's variants share it)."""
    if src is None:
        src = pin(spec, admin=admin, policy=policy)
    else:
        check_trust(spec, policy, admin)
    facts = model_facts(src)
    memory = memory_estimate_gb(facts, spec)
    storage.check_writable(artifact_root / "new-artifact")
    # the job's own preflight, as its worker would make it: the format can hold the settings, its tools
    # and the room for the artifact (checked on the artifact store's file system)
    maker = maker_of(spec)
    maker.preflight(JobContext(artifact_root / "new-artifact", device="cpu"), spec, src, facts)
    if facts is not None and maker.WALKS and worker_memory_gb is not None and memory > worker_memory_gb:
        raise SpecError(f"this job needs about {memory:.1f} GB of device memory and the largest worker has "
                        f"{worker_memory_gb:.1f} GB; lower calibration.samples or calibration.seq_len")
    return Admitted(src, src.revision or src.content_hash, memory)


def warm_up(demo: str = "smollm2-135m") -> None:
    """Read the demo model's facts once at start-up, off the request path."""
    try:
        model_facts(resolve_model(demo))
    except Exception as e:
        log.warning("warm-up on %s failed: %s", demo, e)
    try:
        merge_recipe.load_mergekit()                  # 2 s of imports (peft) a first merge recipe would wait for
    except ImportError as e:
        log.warning("mergekit is not importable: merge recipes will be refused (%s)", e)
