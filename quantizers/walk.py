"""The layer walk: the model stays in CPU memory; one decoder layer at a time moves to the compute
device with the calibration activations, so a model larger than the device is quantized all the same:

    capture layer 0 inputs -> for each layer: the algorithm's layer step (its statistics, quantize,
    run the quantized layer to get the next layer's inputs) -> save the layer's resume state

The steps live beside their math (gptq_layer.py, awq_layer.py, rtn_layer.py) and are named in
algorithms.py; this file knows nothing of any one algorithm.
"""
import dataclasses
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from core.errors import QuantizationError

from . import moe
from .algorithms import algorithm
from .config import QuantConfig
from .grid import QuantizedWeight
from .layer_state import LayerState
from .observe import input_scales
from .layers import (StepOptions, capture_layer_inputs, decoder_layers, is_kept, layer_state, mark_kept,
                     module_names)


@dataclass
class LayerReport:
    index: int
    seconds: float
    modules: dict = field(default_factory=dict)   # name -> {"rel_error", "loss", "damp"}


class Cancelled(Exception):
    """The caller asked to stop; raised at a layer boundary, after the layer's resume state is written."""


MIN_COVERAGE = 0.99


def coverage(model, keep: tuple[str, ...] = ()) -> dict:
    """Which weight matrices of the decoder layers are quantized: Linears (experts included, once
    unfused) but routers and kept ones. `fraction` = quantized / (quantized + missed), where missed
    are matrices quantfarm cannot quantize (a layout it does not know); routers and kept ones are left
    in 16 bits on purpose and listed apart."""
    layers = decoder_layers(model)
    base = next(n for n, m in model.named_modules() if m is layers)
    out = {"quantized_params": 0, "missed": [], "kept": [], "routers": []}
    missed = 0
    for name, p in layers.named_parameters():
        if p.dim() < 2:
            continue
        owner = name.rpartition(".")[0]
        mod, full = layers.get_submodule(owner), f"{base}.{owner}"
        if moe.is_router(owner):
            out["routers"].append(full)
        elif isinstance(mod, nn.Linear) and name.endswith(".weight"):
            if is_kept(mod):
                out["kept"].append(full)
            else:
                out["quantized_params"] += p.numel()
        elif any(fnmatch.fnmatchcase(full, k) or fnmatch.fnmatchcase(f"{base}.{name}", k) for k in keep):
            out["kept"].append(f"{base}.{name}")
        else:
            out["missed"].append(f"{base}.{name}")
            missed += p.numel()
    out["fraction"] = out["quantized_params"] / max(out["quantized_params"] + missed, 1)
    return out


def check_coverage(cov: dict):
    if cov["fraction"] < MIN_COVERAGE:
        shown = ", ".join(cov["missed"][:8]) + (f" and {len(cov['missed']) - 8} more" if len(cov["missed"]) > 8 else "")
        raise QuantizationError(f"only {100 * cov['fraction']:.1f}% of the decoder layers' weight matrices would be "
                                f"quantized; quantfarm does not know how to quantize {shown}. Name them in the job's "
                                "`keep` list to leave them in 16 bits on purpose")


@torch.no_grad()
def quantize_model(model, tokens: torch.Tensor | None, cfg: QuantConfig, device="cpu", state_dir=None,
                   recipe: dict | None = None, on_layer: Callable[[LayerReport, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, replay_bytes: int = 4 * 2 ** 30,
                   on_group: Callable[[int, list[str], torch.Tensor, torch.Tensor, dict], None] | None = None):
    """Quantize every Linear inside the decoder layers of `model` (in place: their weights become
    the dequantized values). lm_head and embeddings stay 16-bit.

    Returns ({full module name: QuantizedWeight}, [LayerReport]). `tokens` [n, seq] are the
    calibration blocks (None for rtn). With `state_dir` the run resumes from completed layers.
    `replay_bytes` bounds the memory spent on replaying frozen modules' outputs (replay.py).
    `on_group(layer, names, W, H, info)` sees each GPTQ group's float weight and Hessian (bench/gpu.py
    checks them against the reference loop).
    """
    device = torch.device(device)
    alg = algorithm(cfg.algorithm)
    moe.unfuse_experts(model)              # fused 3-D experts become per-expert Linears (in place)
    mark_kept(model, cfg.keep)
    layers = decoder_layers(model)
    prefix = module_names(model, layers)
    observes = cfg.scheme.static_inputs           # static input scales come from the calibration forward
    if (alg.NEEDS_DATA or observes) and tokens is None:
        raise QuantizationError(f"{cfg.algorithm}{' with ' + cfg.scheme.named if observes else ''} needs calibration "
                                "tokens")
    state = LayerState(state_dir, recipe or cfg.key()) if state_dir else None
    start = state.layers_done() if state else 0
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i in range(start):      # resume: completed layers take their stored weights and norms
        res, rep, tensors = state.load_layer(i)
        for name, qw in res.items():
            model.get_submodule(name).weight.data = qw.dequantize(model.get_submodule(name).weight.dtype)
        if model.load_state_dict(tensors, strict=False).unexpected_keys:
            raise QuantizationError(f"resume state of layer {i} does not match the model; remove {state_dir}")
        results.update(res)
        reports.append(LayerReport(**rep))

    hidden = kwargs = None
    if alg.NEEDS_DATA or observes:
        hidden, kwargs = capture_layer_inputs(model, layers, tokens, cfg.batch_size, device)
        if start:   # re-split: the interrupted run may have used another batch size
            hidden = list(torch.cat(state.load_inputs(device)).split(cfg.batch_size))

    for i in range(start, len(layers)):
        if should_stop and should_stop():
            raise Cancelled(f"cancelled before layer {i}")
        t0 = time.perf_counter()
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        opts = StepOptions(device, replay_bytes, (lambda *a, i=i: on_group(i, *a)) if on_group else None)
        inputs = hidden
        res, modules, hidden = alg.quantize_layer(layer, hidden, kwargs, cfg, opts)
        if observes:
            scales, hidden = input_scales(layer, inputs, kwargs, cfg.scheme)
            res = {n: dataclasses.replace(v, input_scale=scales[n]) for n, v in res.items()}
        layer.to(home)
        layer_results = {f"{prefix[i]}.{n}": v.cpu() for n, v in res.items()}
        report = LayerReport(i, time.perf_counter() - t0, modules)
        if state:
            state.save(i, layer_results, report.__dict__, hidden or [], layer_state(layer, prefix[i]))
        results.update(layer_results)
        reports.append(report)
        if on_layer:
            on_layer(report, len(layers))
    return results, reports
