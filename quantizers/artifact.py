"""Writing a quantized model as a standard checkpoint folder, and reading one back.

A checkpoint is: sharded safetensors (quantized Linears in the format's tensors, everything else
16-bit), config.json with `quantization_config`, the format's own side file, tokenizer and
generation config, plus any report files. It is written into a temporary sibling folder and
renamed into place, so a reader never sees half an artifact.
"""
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.errors import ArtifactError
from core.paths import atomic_folder, write_atomic

from . import formats, moe
from .activations import fake_quantize
from .config import QuantConfig
from .grid import QuantizedWeight
from .walk import coverage

SHARD_BYTES = 2 * 2 ** 30
INDEX = "model.safetensors.index.json"


def storage_dtype(model) -> torch.dtype:
    """The 16-bit dtype unquantized tensors are stored in: the source's own if 16-bit, else float16."""
    d = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if d in (torch.float16, torch.bfloat16) else torch.float16


def _tied_lm_head(model) -> str | None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        for name, mod in model.named_modules():
            if mod is out:
                return f"{name}.weight"
    return None


def model_tensors(model, quantized: dict[str, QuantizedWeight], fmt: formats.Format,
                  qc: dict) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: the format's tensors (for the layout `qc` names) for quantized Linears,
    16-bit for the rest."""
    encode = fmt.writer(qc)
    dtype = storage_dtype(model)
    skip = {f"{n}.weight" for n in quantized}
    tied = _tied_lm_head(model)
    if tied:
        skip.add(tied)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
               for k, v in model.state_dict().items() if k not in skip}
    for name, qw in quantized.items():
        t = encode(qw, dtype)
        tensors.update({f"{name}.{k}": v.cpu() for k, v in t.items()})
    rename = moe.checkpoint_renamer(model)            # per-expert names as the family's checkpoints have them
    return {rename(k): v for k, v in tensors.items()} if rename else tensors


def file_to_model_names(model, keys) -> dict[str, str]:
    """{checkpoint tensor name: in-memory name} for an (unfused) model: model_tensors' renaming undone,
    module by module (quantized Linears have tensors such as qweight that the model has no entry for)."""
    rename = moe.checkpoint_renamer(model)
    if rename is None:
        return {k: k for k in keys}
    modules = {rename(n): n for n, _ in model.named_modules() if n}
    out = {}
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        out[k] = f"{modules[mod]}.{leaf}" if mod in modules else k
    return out


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = SHARD_BYTES):
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_artifact(out_dir, model, tokenizer, quantized: dict[str, QuantizedWeight], fmt: formats.Format,
                   quant_config: dict, side_files: dict[str, dict] | None = None,
                   extra_files: dict[str, str | bytes] | None = None, overwrite: bool = False,
                   max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the checkpoint atomically: a temporary sibling folder renamed into place (an existing one,
    with `overwrite`, swapped out whole)."""
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or remove it")
    with atomic_folder(out, replace=True) as tmp:
        save_sharded(model_tensors(model, quantized, fmt, quant_config), tmp, max_shard_bytes)
        config = model.config.to_dict()
        config.pop("_name_or_path", None)            # a path on the machine that made it, meaningless elsewhere
        if not config.get("architectures"):
            config["architectures"] = [type(model).__name__]
        config["quantization_config"] = quant_config
        config["dtype"] = str(storage_dtype(model)).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (side_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        mode = (tmp / "config.json").stat().st_mode & 0o777        # what the umask gives a new file
        for f in tmp.glob("*.safetensors"):                          # safetensors writes these owner-only
            f.chmod(mode)
    return out


def with_scale_dtype(cfg: QuantConfig, fmt: str, model) -> QuantConfig:
    """The config with the scale dtype the format stores (GPTQ and AWQ float16, compressed-tensors the
    model's): the grids round scales to it before choosing codes, so the artifact holds exactly what
    was computed."""
    dtype = formats.get(fmt).scale_dtype(storage_dtype(model))
    return dataclasses.replace(cfg, scheme=cfg.scheme.replace(scale_dtype=str(dtype).removeprefix("torch.")))


def save(out_dir, model, tokenizer, quantized, cfg: QuantConfig, fmt: str, meta: dict, overwrite: bool = False) -> Path:
    """Write the artifact in a format of the table, with its quantization_config and side files."""
    f = formats.get(fmt)
    qc, side = f.config(cfg.scheme, {"true_sequential": cfg.true_sequential, "damp_percent": cfg.damp_percent}, meta)
    rename = moe.checkpoint_renamer(model) or (lambda n: n)
    # every decoder Linear left 16-bit (kept ones, routers): a loader that is not told quantizes it too
    # (vLLM's Qwen-MoE gates take the model's quant_config)
    cover = coverage(model, cfg.keep)
    f.declare_kept(qc, [rename(n) for n in cover["routers"] + cover["kept"]])
    return write_artifact(out_dir, model, tokenizer, quantized, f, qc, side_files=side, overwrite=overwrite)


def add_file(artifact_dir, name: str, content: str | bytes):
    """Add or replace one file inside a finished artifact (write to a temp name, then rename)."""
    write_atomic(Path(artifact_dir) / name, content)


# ---------------------------------------------------------------------------------------------
# Reading back


class DequantLinear(nn.Module):
    """A Linear whose weight is the dequantization of a QuantizedWeight, computed once at load; with `inputs`
    (a scheme's activations, W8A8's int8 per token) its input is rounded as the runtime rounds it."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, inputs=None):
        super().__init__()
        self.quantized, self.inputs = qw, inputs
        self.out_features, self.in_features = qw.codes.shape
        self.register_buffer("weight", qw.dequantize(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x):
        if self.inputs is not None:
            x = fake_quantize(x, self.inputs, self.quantized.input_scale)
        return nn.functional.linear(x, self.weight, self.bias)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for f in files:
        if not (folder / f).exists():
            raise ArtifactError(f"{folder} is missing {f}")
        with safe_open(str(folder / f), framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return tensors


def tensor_nbytes(folder) -> dict[str, int]:
    """{tensor name: bytes} from the safetensors headers (no tensor is read)."""
    import struct
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        out.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return out


def read_quant_config(folder) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ArtifactError(f"{folder} is not an artifact: no config.json")
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not qc:
        raise ArtifactError(f"{folder}/config.json has no quantization_config")
    return qc


def quantized_weights(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, QuantizedWeight]:
    """Pop each quantized Linear's tensors out of `tensors` and decode them."""
    fmt = formats.of_config(qc)
    names, decode = fmt.reader(qc)
    marker = "." + fmt.marker_of(qc)
    out = {}
    for n in [k[:-len(marker)] for k in tensors if k.endswith(marker)]:
        out[n] = decode({k: tensors.pop(f"{n}.{k}") for k in names if f"{n}.{k}" in tensors})
    return out


def load_artifact(path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load an artifact into a transformers model whose quantized Linears dequantize their stored
    integers. Returns (model, tokenizer or None, quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    qc = read_quant_config(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    moe.unfuse_experts(model)                    # artifacts hold experts one Linear per expert
    tensors = read_tensors(folder)
    names = file_to_model_names(model, tensors)
    tensors = {names[k]: v for k, v in tensors.items()}
    quantized = quantized_weights(tensors, qc)
    inputs = formats.of_config(qc).activations(qc)
    for name, qw in quantized.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = tensors.get(f"{name}.bias")   # stays in tensors: load_state_dict fills the same parameter
        setattr(parent, child, DequantLinear(qw, bias, dtype, inputs))
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                   strict=False)
    expected_missing = {f"{n}.weight" for n in quantized}
    tied = _tied_lm_head(model)
    missing = set(result.missing_keys) - expected_missing - ({tied} if tied else set())
    if missing or result.unexpected_keys:
        raise ArtifactError(f"artifact tensors do not match the model: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    return model, tok, qc
