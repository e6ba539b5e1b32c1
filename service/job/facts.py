"""Model facts from the model's config alone: a meta-device model built from it has every Linear shape
and no weight bytes, so admission and releases know widths and sizes before anything is downloaded or
loaded. Computed once per model content under one lock, so concurrent first submissions never race on
transformers' lazy imports.
"""
import logging
import threading
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from core.errors import SpecError

from . import preflight
from .sources import ResolvedModel

log = logging.getLogger("quantfarm.facts")


@dataclass(frozen=True)
class ModelFacts:
    hidden: int
    intermediate: int
    shapes: frozenset          # (in, out) of every Linear the layer walk quantizes
    meta_model: object         # the model on the meta device: shapes and parameter counts, no weights
    quantized: str | None = None   # what the config's quantization_config declares the weights are (None: 16-bit)

    @property
    def widest_input(self) -> int:
        return max(i for i, _ in self.shapes)


_facts: dict[str, ModelFacts | None] = {}
_facts_lock = threading.Lock()


def model_facts(src: ResolvedModel) -> ModelFacts | None:
    """The model's shapes from its config, or None when they cannot be read here (custom code, an
    architecture transformers does not know): the worker's own preflight then decides. A source whose config
    declares its weights already quantized is refused here, before any weight is fetched or loaded."""
    key = f"{src.content_hash}:{src.gguf_file}"
    with _facts_lock:
        if key not in _facts:
            _facts[key] = None if src.trust_remote_code else _read_facts(src)
            if len(_facts) > 64:
                _facts.pop(next(iter(_facts)))
        facts = _facts[key]
    if facts is not None and facts.quantized:
        raise SpecError(f"model {src.ref} is already quantized ({facts.quantized}, its config's quantization_config); "
                        "quantfarm quantizes 16-bit sources, and reading quantized weights back to 16 bits first is "
                        "not implemented: give the model it was made from")
    return facts


def _declared_quantization(cfg) -> str | None:
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return " ".join(str(x) for x in (qc.get("quant_method"), qc.get("format") or qc.get("fmt")) if x) or "unknown"


def _read_facts(src: ResolvedModel) -> ModelFacts | None:
    from quantizers.layers import decoder_layers
    try:
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        if src.merge is not None and not src.merge.built:         # a merge not made yet: the config it will have
            cfg = src.merge.out_config()
        else:
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
    return ModelFacts(h, getattr(text, "intermediate_size", 4 * h), frozenset(preflight.model_shapes(model)), model,
                      None if src.gguf_file else _declared_quantization(cfg))
