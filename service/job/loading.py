"""Loading a resolved source on the CPU, the float16 safetensors copy a GGUF source loads from, and what the
artifact's card says about the source (its name, license and language).

Why a GGUF source gets a folder of its own (fp16_folder): dequantizing through transformers takes seconds per
load, and the tools that take a source as a checkpoint folder (mergekit, vLLM, llama.cpp's converter) read no
GGUF file.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from core.errors import ModelSourceError
from core.paths import atomic_folder, cache_root, write_atomic

from .hub_source import is_repo_id
from .sources import ResolvedModel

log = logging.getLogger(__name__)


def load_model(resolved: ResolvedModel, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) on the CPU in eval mode. GGUF weights are dequantized by transformers; the
    leftover "gguf" quantization config is removed so a checkpoint written from this model is a plain one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True)
    where = f"model {resolved.ref}"
    try:
        if resolved.gguf_file:
            folder = _gguf_snapshot(resolved)
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **common)
        else:
            folder = Path(resolved.path)
            pickle_only = resolved.allow_pickle and not any(folder.glob("*.safetensors"))
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, **common)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype,
                                                         use_safetensors=not pickle_only, **common)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise ModelSourceError(f"cannot load {where} from {resolved.path}: {e}") from e
    _drop_quantization_config(model)
    model.config.dtype = _declared_dtype(resolved) or dtype
    _align_eos(model, tokenizer)
    model.eval()
    return model, tokenizer


def load_tokenizer(resolved: ResolvedModel):
    """The tokenizer `load_model` returns, without loading the weights (its EOS aligned with the config's)."""
    from transformers import AutoConfig, AutoTokenizer
    folder = fp16_folder(resolved)
    common = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        config = AutoConfig.from_pretrained(folder, **common)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load the tokenizer of {resolved.ref} from {folder}: {e}") from e
    _align_eos(SimpleNamespace(config=getattr(config, "text_config", config)), tokenizer)
    return tokenizer


def fp16_folder(resolved: ResolvedModel) -> Path:
    """A checkpoint folder of the source any runtime loads: the folder itself, or a GGUF source's fp16 copy."""
    return _gguf_snapshot(resolved) if resolved.gguf_file else Path(resolved.path)


def source_name(resolved: ResolvedModel) -> str:
    """What the artifact's card calls the source: the Hub id, the demo's or merge's name, a local folder's or
    GGUF file's own name; never the server's path to it. A folder named by a commit (a Hub cache snapshot)
    says nothing: its repo's name from the cache layout, else the config's `_name_or_path` when that is a Hub
    id (only then: a fine-tune saved from a Hub model keeps its base model's `_name_or_path`)."""
    if resolved.kind == "hub":
        return resolved.ref.split("@", 1)[0]
    if resolved.kind in ("demo", "merge"):
        return resolved.ref
    if resolved.gguf_file:                           # kind gguf (the demo, also a GGUF file, returned above)
        return Path(resolved.gguf_file).stem
    folder = Path(resolved.path)
    if not re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    cached = re.fullmatch(r"models--([^/]+)--([^/]+)", folder.parent.parent.name)
    if cached and folder.parent.name == "snapshots":
        return f"{cached[1]}/{cached[2]}"
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and is_repo_id(named) else folder.name


def source_card(resolved: ResolvedModel) -> dict:
    """License and language of the source model, for the artifact's card: from the source folder's
    README.md front matter, or a GGUF file's general.license / general.languages; and its name (source_name)."""
    out = {"name": source_name(resolved)}
    try:
        if resolved.gguf_file:
            out.update(_gguf_card(resolved))
        elif (Path(resolved.path) / "README.md").is_file():
            from huggingface_hub import ModelCard
            data = ModelCard.load(Path(resolved.path) / "README.md").data
            out.update({k: getattr(data, k) for k in ("license", "language") if getattr(data, k, None)})
    except Exception as e:            # a card that cannot be read is no reason to fail a job
        log.warning("could not read the source card of %s: %s", resolved.ref, e)
    return out


def _gguf_card(resolved: ResolvedModel) -> dict:
    """A GGUF file's general.license and general.languages, kept per file content in the cache: gguf's reader
    parses every field to give two short strings, the vocabulary's too (4 s for SmolLM2's 49,152 tokens)."""
    path = cache_root() / "gguf" / f"{resolved.content_hash[:32]}-card.json"
    if path.is_file():
        return json.loads(path.read_text())
    import gguf
    fields = gguf.GGUFReader(str(Path(resolved.path) / resolved.gguf_file)).fields
    out = {name: fields[key].contents() for key, name in (("general.license", "license"),
                                                          ("general.languages", "language")) if key in fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out))
    return out


def _gguf_snapshot(resolved: ResolvedModel) -> Path:
    """A GGUF source as a plain float16 safetensors folder, converted once per file content and
    transformers version. Dequantizing through transformers takes seconds per load (17 s for
    SmolLM2-135M), the folder loads in one; the values are those of the dequantized model rounded
    to float16, the storage dtype every job rounds a GGUF source to anyway (steps.round_to_storage)."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "gguf" / f"{resolved.content_hash[:32]}-transformers{transformers.__version__}"
    if (folder / "model.safetensors").is_file():
        return folder
    kw = dict(trust_remote_code=resolved.trust_remote_code, local_files_only=True, gguf_file=resolved.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kw)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, **kw)
    _drop_quantization_config(model)
    _align_eos(model, tokenizer)
    try:
        with atomic_folder(folder) as tmp:
            state, seen = {}, set()
            for k, v in model.state_dict().items():        # tied weights (lm_head = embeddings) once
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    state[k] = v.to(torch.float16).contiguous()
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.architectures = [type(model).__name__]
            model.config.dtype = torch.float16
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (folder / "model.safetensors").is_file():      # another process's copy is as good as ours
            raise
    return folder


def _declared_dtype(resolved: ResolvedModel):
    """The 16-bit dtype the source checkpoint declares (kept so the artifact stores bf16 sources as bf16)."""
    cfg = Path(resolved.path) / "config.json"
    if resolved.gguf_file or not cfg.exists():
        return None
    d = json.loads(cfg.read_text())
    name = d.get("dtype") or d.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def _align_eos(model, tokenizer) -> None:
    """Make the tokenizer's EOS the model's: the tokenizer transformers builds from SmolLM2's GGUF says
    <|im_start|> (id 1) while the model ends turns with id 2. Calibration separates documents with it
    and the artifact ships this tokenizer, so the model config wins."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int) and tokenizer.eos_token_id != eos and 0 <= eos < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def _drop_quantization_config(model) -> None:
    """What transformers' own HfQuantizer.remove_quantization_config does, for the dequantized GGUF case."""
    if getattr(model.config, "quantization_config", None) is None and not hasattr(model, "hf_quantizer"):
        return
    for obj, attr in ((model, "hf_quantizer"), (model, "quantization_method"),
                      (model.config, "quantization_config"), (model.config, "_is_quantized")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    model.is_quantized = False
