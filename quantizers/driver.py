"""The layer-by-layer driver: the only code that knows how a transformers decoder model is built.

The model stays in CPU memory; one decoder layer at a time moves to the compute device with the
calibration activations, so a model larger than the device is quantized all the same:

    capture layer 0 inputs -> for each layer: collect Hessians (one per distinct input) ->
    quantize -> run the quantized layer to get the next layer's inputs -> checkpoint

Linears that read the same input tensor (q/k/v, gate/up) share one Hessian and are quantized as
one row-concatenated matrix. With true_sequential each such group is quantized before the inputs
of the next group are collected, so o_proj sees the output of the quantized q/k/v, and so on;
the forward stops early (StopForward) once the group being collected has seen its input.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.errors import QuantizationError

from . import gptq, rtn
from .grid import QuantizedWeight
from .replay import Replay


@dataclass(frozen=True)
class QuantConfig:
    algorithm: str = "gptq"          # gptq | rtn
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    batch_size: int = 8              # calibration samples per forward

    def key(self) -> dict:
        """The settings that change the result (batch_size does not)."""
        return {k: v for k, v in self.__dict__.items() if k != "batch_size"}


@dataclass
class LayerReport:
    index: int
    seconds: float
    modules: dict = field(default_factory=dict)   # name -> {"rel_error", "loss", "damp"}


class StopForward(Exception):
    """Raised from a hook once the inputs we need have been seen: the rest of the forward is skipped."""


class Cancelled(Exception):
    """The caller asked to stop; raised at a layer boundary, after the checkpoint is written."""


def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder layers: the ModuleList whose length is num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise QuantizationError(f"{type(model).__name__}: no list of {n} decoder layers found; only decoder "
                            "models with a list of layers (Llama, Mistral, Qwen2, Phi-3, Gemma, ...) are supported")


def _module_names(model, layers) -> dict[int, str]:
    ids = {id(l): i for i, l in enumerate(layers)}
    return {ids[id(m)]: name for name, m in model.named_modules() if id(m) in ids}


@torch.no_grad()
def capture_layer_inputs(model, layers, tokens: torch.Tensor, batch_size: int, device):
    """Run the model up to layer 0 for each batch; return ([hidden states], [kwargs]) on `device`."""
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).to(device))
        kwargs.append({k: _to(v, device) for k, v in kw.items() if k != "hidden_states"})
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


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


def _linears(layer) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def input_groups(layer, hidden, kwargs) -> list[list[str]]:
    """Linears of `layer` grouped by the input tensor they read, in call order."""
    order = []          # (name, input tensor): holding the tensors keeps their memory from being reused
    linears = _linears(layer)
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append((n, args[0])))
             for n, m in linears.items()]
    try:
        _run_layer(layer, hidden[0][:1], _slice_kwargs(kwargs[0], 1))
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


def _slice_kwargs(kw, n):
    """kwargs for the first n samples of a batch (masks with a batch dimension are cut too)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] > n:
            v = v[:n]
        out[k] = v
    return out


def _run_layer(layer, h, kw):
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_hessians(layer, groups: list[list[str]], hidden, kwargs, device, replay: Replay) -> dict[str, torch.Tensor]:
    """One Hessian per group, from its first Linear's inputs over all batches."""
    linears = _linears(layer)
    acc = {g[0]: gptq.HessianAccumulator(linears[g[0]].in_features, device) for g in groups}
    last = groups[-1][0]

    def make_hook(name):
        def hook(_mod, args):
            acc[name].add(args[0])
            if name == last:
                raise StopForward
        return hook

    hooks = [linears[g[0]].register_forward_pre_hook(make_hook(g[0])) for g in groups]
    try:
        for b, (h, kw) in enumerate(zip(hidden, kwargs)):
            replay.batch = b
            try:
                _run_layer(layer, h, kw)
            except StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    replay.end_pass()
    return {name: a.result() for name, a in acc.items()}


def run_layer_batches(layer, hidden, kwargs, replay: Replay) -> list[torch.Tensor]:
    """The layer's outputs for every batch: the next layer's inputs (nothing new is recorded)."""
    replay.recording_on = False
    out = []
    for b, (h, kw) in enumerate(zip(hidden, kwargs)):
        replay.batch = b
        out.append(_run_layer(layer, h, kw))
    return out


def quantize_group(linears: list[nn.Linear], H: torch.Tensor | None, cfg: QuantConfig):
    """Quantize Linears sharing one input as one stacked matrix; returns per-Linear results."""
    W = torch.cat([m.weight.float() for m in linears])
    if cfg.algorithm == "gptq":
        qw, stats = gptq.quantize_weight(W, H, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act,
                                         cfg.static_groups, cfg.damp_percent)
        info = {"loss": stats.loss, "rel_error": stats.rel_error, "damp": stats.damp}
    elif cfg.algorithm == "rtn":
        qw = rtn.quantize_weight(W, cfg.bits, cfg.group_size, cfg.sym)
        info = {}
        if H is not None:
            E = qw.dequantize() - W
            info["rel_error"] = (torch.sum((E @ H) * E) / torch.sum((W @ H) * W).clamp(min=1e-30)).item()
    else:
        raise QuantizationError(f"algorithm {cfg.algorithm!r} is not implemented in this driver")
    out, start = [], 0
    for m in linears:
        part = qw.rows(start, start + m.out_features)
        m.weight.data = part.dequantize(m.weight.dtype)
        out.append((part, info))
        start += m.out_features
    return out


class LayerCheckpoint:
    """Per-layer state on disk so an interrupted run resumes at the last completed layer.

    After layer i: layer_{i}.safetensors holds its quantized Linears, inputs.safetensors the
    activations entering layer i + 1, manifest.json says how many layers are done and for which
    recipe. Each file is written to a temporary name and renamed; the manifest goes last.
    """

    def __init__(self, folder, recipe: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.recipe = recipe

    def layers_done(self) -> int:
        m = self.folder / "manifest.json"
        if not m.exists():
            return 0
        data = json.loads(m.read_text())
        return data["layers_done"] if data.get("recipe") == self.recipe else 0

    def save(self, index: int, results: dict[str, QuantizedWeight], report: LayerReport, hidden: list[torch.Tensor]):
        t = {}
        for name, qw in results.items():
            for k in ("codes", "scales", "zeros", "g_idx"):
                t[f"{name}.{k}"] = getattr(qw, k).detach().cpu().clone()   # q/k/v share g_idx storage
        self._save(f"layer_{index:05d}.safetensors", t, {"report": json.dumps(report.__dict__)})
        self._save("inputs.safetensors", {f"b{i}": h.contiguous().cpu() for i, h in enumerate(hidden)}, {})
        self._write("manifest.json", json.dumps({"recipe": self.recipe, "layers_done": index + 1}).encode())

    def load_layer(self, index: int, cfg: QuantConfig):
        from safetensors import safe_open
        path = self.folder / f"layer_{index:05d}.safetensors"
        t = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            rep = json.loads(f.metadata()["report"])
        names = sorted({k.rsplit(".", 1)[0] for k in t})
        results = {n: QuantizedWeight(t[f"{n}.codes"], t[f"{n}.scales"], t[f"{n}.zeros"], t[f"{n}.g_idx"],
                                      cfg.bits, cfg.group_size, cfg.sym) for n in names}
        return results, LayerReport(**rep)

    def load_inputs(self, device) -> list[torch.Tensor]:
        t = load_file(str(self.folder / "inputs.safetensors"))
        return [t[f"b{i}"].to(device) for i in range(len(t))]

    def _save(self, name, tensors, metadata):
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.folder / name)

    def _write(self, name, data: bytes):
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)


@torch.no_grad()
def quantize_model(model, tokens: torch.Tensor | None, cfg: QuantConfig, device="cpu", checkpoint_dir=None,
                   recipe: dict | None = None, on_layer: Callable[[LayerReport, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, replay_bytes: int = 4 * 2 ** 30):
    """Quantize every Linear inside the decoder layers of `model` (in place: their weights become
    the dequantized values). lm_head and embeddings stay 16-bit.

    Returns ({full module name: QuantizedWeight}, [LayerReport]). `tokens` [n, seq] are the
    calibration blocks (None for rtn). With `checkpoint_dir` the run resumes from completed layers.
    `replay_bytes` bounds the memory spent on replaying frozen modules' outputs (replay.py).
    """
    import time

    device = torch.device(device)
    layers = decoder_layers(model)
    prefix = _module_names(model, layers)
    needs_data = cfg.algorithm != "rtn"
    if needs_data and tokens is None:
        raise QuantizationError(f"{cfg.algorithm} needs calibration tokens")
    ckpt = LayerCheckpoint(checkpoint_dir, recipe or cfg.key()) if checkpoint_dir else None
    start = ckpt.layers_done() if ckpt else 0
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i in range(start):      # resume: completed layers take their stored quantized weights
        res, rep = ckpt.load_layer(i, cfg)
        for name, qw in res.items():
            model.get_submodule(name).weight.data = qw.dequantize(model.get_submodule(name).weight.dtype)
        results.update(res)
        reports.append(rep)

    hidden = kwargs = None
    if needs_data:
        hidden, kwargs = capture_layer_inputs(model, layers, tokens, cfg.batch_size, device)
        if start:   # re-split: the interrupted run may have used another batch size
            hidden = list(torch.cat(ckpt.load_inputs(device)).split(cfg.batch_size))

    for i in range(start, len(layers)):
        if should_stop and should_stop():
            raise Cancelled(f"cancelled before layer {i}")
        t0 = time.perf_counter()
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        linears = _linears(layer)
        layer_results, report = {}, LayerReport(i, 0.0)
        if needs_data:
            groups = input_groups(layer, hidden, kwargs)
            stages = [[g] for g in groups] if cfg.true_sequential else [groups]
            replay = Replay(layer, len(hidden), replay_bytes)
            try:
                for stage in stages:
                    Hs = collect_hessians(layer, stage, hidden, kwargs, device, replay)
                    for g in stage:
                        for n, (qw, info) in zip(g, quantize_group([linears[n] for n in g], Hs[g[0]], cfg)):
                            layer_results[f"{prefix[i]}.{n}"] = qw
                            report.modules[n] = info
                        replay.freeze(linears[n] for n in g)
                    del Hs
                hidden = run_layer_batches(layer, hidden, kwargs, replay)
            finally:
                replay.close()
        else:
            for n, m in linears.items():
                (qw, info), = quantize_group([m], None, cfg)
                layer_results[f"{prefix[i]}.{n}"] = qw
                report.modules[n] = info
        layer.to(home)
        layer_results = {k: QuantizedWeight(v.codes.cpu(), v.scales.cpu(), v.zeros.cpu(), v.g_idx.cpu(),
                                            v.bits, v.group_size, v.sym) for k, v in layer_results.items()}
        report.seconds = time.perf_counter() - t0
        if ckpt:
            ckpt.save(i, layer_results, report, hidden or [])
        results.update(layer_results)
        reports.append(report)
        if on_layer:
            on_layer(report, len(layers))
    return results, reports
