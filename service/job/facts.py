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

from . import preflight
from .sources import ResolvedModel

log = logging.getLogger("quantfarm.facts")


@dataclass(frozen=True)
class ModelFacts:
    hidden: int
    intermediate: int
    shapes: frozenset          # (in, out) of every Linear the layer walk quantizes
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
    return ModelFacts(h, getattr(text, "intermediate_size", 4 * h), frozenset(preflight.model_shapes(model)), model)
