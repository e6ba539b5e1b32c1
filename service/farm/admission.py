"""What a submission must pass before it is queued: the server's policy (remote code, pickle, local
files), the same format preflight as `quantize` on the model's Linear shapes, the memory budget of the
largest worker, and room for the artifact. A job refused here costs the submitter a second, not a
worker's hour.

Model facts (Linear shapes, widths, sizes) come from the model's config alone: a meta-device model
built from it has every shape and no weight bytes. They are computed once per model content under one
lock, so concurrent first submissions never race on transformers' lazy imports.
"""
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
# imported when the app is created, never lazily on a request thread: concurrent first imports of
# transformers' and huggingface_hub's lazy modules are what lost submissions to a cold server
from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache  # noqa: F401
from huggingface_hub import errors as hub_errors  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM

from core.errors import SpecError
from quantizers import estimates
from service.job import preflight, storage
from service.job.models import ResolvedModel, resolve_model
from service.job.pipeline import target
from service.job.spec import JobSpec

from .policy import Policy, check_local_files, check_trust

log = logging.getLogger("quantfarm.api")


@dataclass(frozen=True)
class ModelFacts:
    hidden: int
    intermediate: int
    shapes: frozenset          # (in, out) of every Linear the driver quantizes
    meta_model: object         # the model on the meta device: shapes and parameter counts, no weights

    @property
    def widest_input(self) -> int:
        return max(i for i, _ in self.shapes)


_facts: dict[str, ModelFacts | None] = {}
_facts_lock = threading.Lock()


def model_facts(src: ResolvedModel) -> ModelFacts | None:
    """The model's shapes from its config, or None when they cannot be read here (custom code, an
    architecture transformers does not know): the worker's own preflight then decides."""
    key = f"{src.content_hash}:{src.gguf_file}"
    with _facts_lock:
        if key not in _facts:
            _facts[key] = None if src.trust_remote_code else _read_facts(src)
            if len(_facts) > 64:
                _facts.pop(next(iter(_facts)))
        return _facts[key]


def _read_facts(src: ResolvedModel) -> ModelFacts | None:
    from quantizers.layers import decoder_layers
    try:
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        cfg = AutoConfig.from_pretrained(src.path, trust_remote_code=False, local_files_only=True, **kw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        decoder_layers(model)
    except Exception as e:            # anything the config cannot tell: not a reason to refuse here
        log.warning("model %s: shapes not readable from its config (%s: %s); the worker checks them",
                    src.ref, type(e).__name__, e)
        return None
    text = getattr(cfg, "text_config", cfg)
    h = text.hidden_size
    return ModelFacts(h, getattr(text, "intermediate_size", 4 * h), frozenset(preflight.model_shapes(model)), model)


def memory_estimate_gb(facts: ModelFacts | None, spec: JobSpec) -> float:
    """Device memory the job's layer walk needs (quantizers/estimates.py); 0 when the shapes are unknown."""
    if facts is None:
        return 0.0
    return estimates.device_memory_gb(facts.hidden, facts.intermediate, spec.calibration.samples * spec.calibration.seq_len)


def artifact_bytes_estimate(facts: ModelFacts | None, spec: JobSpec) -> int:
    """Bytes the artifact's weights will take (0 when the shapes are unknown)."""
    return 0 if facts is None else estimates.artifact_bytes(facts.meta_model, spec.quant_config().scheme)


@dataclass
class Admitted:
    source: ResolvedModel
    revision: str
    memory_gb: float


def admit(spec: JobSpec, *, admin: bool, policy: Policy, artifact_root: Path,
          worker_memory_gb: float | None) -> Admitted:
    """Every check a job passes before it is queued; raises the first that fails (4xx or 507)."""
    check_trust(spec, policy, admin)
    check_local_files(spec, policy)
    src = resolve_model(spec.model, spec.revision, allow_pickle=spec.allow_pickle,
                        trust_remote_code=spec.trust_remote_code, local_roots=list(policy.model_roots))
    facts = model_facts(src)
    memory = memory_estimate_gb(facts, spec)
    if facts is not None:
        if spec.group_size > facts.widest_input:
            raise SpecError(f"group_size {spec.group_size} is wider than the model's widest Linear input "
                            f"({facts.widest_input}); use -1 for one group per row, or at most {facts.widest_input}")
        preflight.refuse_unwritable(preflight.report(target(spec.quant_config(), spec.format), set(facts.shapes)))
        if worker_memory_gb is not None and memory > worker_memory_gb:
            raise SpecError(f"this job needs about {memory:.1f} GB of device memory and the largest worker has "
                            f"{worker_memory_gb:.1f} GB; lower calibration.samples or calibration.seq_len")
    storage.check_writable(artifact_root / "new-artifact")
    storage.check_space(artifact_root, artifact_bytes_estimate(facts, spec))
    return Admitted(src, src.revision or src.content_hash, memory)


def warm_up(demo: str = "smollm2-135m") -> None:
    """Read the demo model's facts once at start-up, off the request path."""
    try:
        model_facts(resolve_model(demo))
    except Exception as e:
        log.warning("warm-up on %s failed: %s", demo, e)
