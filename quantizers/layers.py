"""The model plumbing every algorithm shares: the decoder layers of a transformers model, the Linears
of a layer grouped by the input tensor they read, and running a layer on the calibration batches.
Groups are found by tensor identity, not per-model tables, so any decoder family works."""
import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.errors import QuantizationError

from . import moe


class StopForward(Exception):
    """Raised from a hook once the inputs we need have been seen: the rest of the forward is skipped."""


@dataclass(frozen=True)
class StepOptions:
    """What a layer step gets besides the layer, its inputs and the QuantConfig."""
    device: torch.device
    replay_bytes: int = 4 * 2 ** 30     # memory for replaying frozen modules' outputs (replay.py)
    on_group: Callable | None = None    # on_group(names, W, H, info) sees each GPTQ group (bench/gpu.py)


def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder layers: the ModuleList whose length is num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise QuantizationError(f"{type(model).__name__}: no list of {n} decoder layers found; only decoder "
                            "models with a list of layers (Llama, Mistral, Qwen2, Phi-3, Gemma, ...) are supported")


def module_names(model, layers) -> dict[int, str]:
    ids = {id(l): i for i, l in enumerate(layers)}
    return {ids[id(m)]: name for name, m in model.named_modules() if id(m) in ids}


@torch.no_grad()
def capture_layer_inputs(model, layers, tokens: torch.Tensor, batch_size: int, device):
    """Run the model up to layer 0 for each batch; return ([hidden states], [kwargs]) on `device`."""
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).to(device))
        kwargs.append({k: to_device(v, device) for k, v in kw.items() if k != "hidden_states"})
        raise StopForward

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[b:b + batch_size], use_cache=False)
            except StopForward:
                pass
    finally:
        h.remove()
    return hidden, kwargs


def to_device(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(to_device(x, device) for x in v)
    return v


def layer_linears(layer) -> dict[str, nn.Linear]:
    """The Linears of a layer that take part in quantization: all but MoE routers (moe.ROUTER_LEAVES).
    Those marked kept (QuantConfig.keep) are smoothed with their group by AWQ but never quantized."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not moe.is_router(n)}


def is_kept(m: nn.Module) -> bool:
    return getattr(m, "quantfarm_keep", False)


def mark_kept(model, patterns) -> list[str]:
    """Mark the Linears whose full names match `patterns` (fnmatch) as kept in 16 bits; returns their names."""
    kept = [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for n in kept:
        model.get_submodule(n).quantfarm_keep = True
    return kept


def one_sample(layer, hidden, kwargs):
    """The layer on the first calibration sample, every expert visited (routed or not)."""
    experts = [m for m in layer.modules() if isinstance(m, moe.UnfusedExperts)]
    for m in experts:
        m.visit_all = True
    try:
        run_layer(layer, hidden[0][:1], slice_kwargs(kwargs[0], 1))
    finally:
        for m in experts:
            m.visit_all = False


@torch.no_grad()
def input_groups(layer, hidden, kwargs) -> list[list[str]]:
    """Linears of `layer` grouped by the input tensor they read, in call order."""
    order = []          # (name, input tensor): holding the tensors keeps their memory from being reused
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append((n, args[0])))
             for n, m in layer_linears(layer).items()]
    try:
        one_sample(layer, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups, seen = [], set()
    for n, x in order:
        if n in seen:
            continue
        if groups and x is groups[-1][1]:
            groups[-1][0].append(n)
        else:
            groups.append(([n], x))
        seen.add(n)
    return [g for g, _ in groups]


def slice_kwargs(kw, n):
    """kwargs for the first n samples of a batch (masks with a batch dimension are cut too)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] > n:
            v = v[:n]
        out[k] = v
    return out


def run_layer(layer, h, kw):
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def layer_state(layer, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's tensors outside its Linears (norms): AWQ changes them, a resume restores them."""
    lin = {f"{n}.{p}" for n in layer_linears(layer) for p in ("weight", "bias")}
    return {f"{prefix}.{k}": v for k, v in layer.state_dict().items() if k not in lin}


def split_rows(linears: list[nn.Linear], qw, info: dict):
    """A stacked result cut back into its Linears, whose weights become the dequantized values."""
    out, start = [], 0
    for m in linears:
        part = qw.rows(start, start + m.out_features)
        m.weight.data = part.dequantize(m.weight.dtype)
        out.append((part, info))
        start += m.out_features
    return out
