"""The layer-by-layer driver: the only code that knows how a transformers decoder model is built.

The model stays in CPU memory; one decoder layer at a time moves to the compute device with the
calibration activations, so a model larger than the device is quantized all the same:

    capture layer 0 inputs -> for each layer: collect Hessians (one per distinct input) ->
    quantize -> run the quantized layer to get the next layer's inputs -> checkpoint

Linears that read the same input tensor (q/k/v, gate/up) share one Hessian and are quantized as
one row-concatenated matrix. With true_sequential each such group is quantized before the inputs
of the next group are collected, so o_proj sees the output of the quantized q/k/v, and so on;
the forward stops early (StopForward) once the group being collected has seen its input.

AWQ takes one full forward per layer instead (Hessians, mean |x| and the calls into each scored
block), then searches a scale per group and folds it into the op that produced the group's input
(a norm, found by tensor identity, or v -> o / up -> down), clips and quantizes; awq.py holds the
math, this file the model plumbing.
"""
import copy
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from service.errors import QuantizationError

from . import awq, gptq, moe, rtn
from .checkpoint import LayerCheckpoint
from .grid import QuantizedWeight
from .replay import Replay


@dataclass(frozen=True)
class QuantConfig:
    algorithm: str = "gptq"          # gptq | awq | rtn
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    awq_grid: int = 20               # AWQ scale-search candidates
    awq_duo: str = "duo"             # "duo": identity + duo-scaled ratios; "both": half each; "plain"
    awq_clip: bool = True            # AWQ weight-clipping search
    search_dtype: str = "auto"       # AWQ block forwards: auto = bfloat16 where it is fast, else float32
    awq_search_tokens: int = 8192    # AWQ scale candidates are scored on the first batches up to this many
                                     # tokens (0: all); Hessians, mean |x| and clipping use every token
    expert_min_tokens: int = 128     # an MoE expert routed fewer calibration tokens takes the statistics of
                                     # every token its layer's experts receive (the report counts them)
    keep: tuple[str, ...] = ()       # module names (fnmatch patterns) left in 16 bits on purpose
    scale_dtype: str = "float16"     # dtype the checkpoint stores scales in (compressed-tensors: the model's)
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
    """The Linears of a layer that take part in quantization: all but MoE routers (moe.ROUTER_LEAVES).
    Those marked kept (QuantConfig.keep) are smoothed with their group by AWQ but never quantized."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not moe.is_router(n)}


def _kept(m: nn.Module) -> bool:
    return getattr(m, "quantfarm_keep", False)


def mark_kept(model, patterns) -> list[str]:
    """Mark the Linears whose full names match `patterns` (fnmatch) as kept in 16 bits; returns their names."""
    kept = [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for n in kept:
        model.get_submodule(n).quantfarm_keep = True
    return kept


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
            if _kept(mod):
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


def _one_sample(layer, hidden, kwargs):
    """The layer on the first calibration sample, every expert visited (routed or not)."""
    experts = [m for m in layer.modules() if isinstance(m, moe.UnfusedExperts)]
    for m in experts:
        m.visit_all = True
    try:
        _run_layer(layer, hidden[0][:1], _slice_kwargs(kwargs[0], 1))
    finally:
        for m in experts:
            m.visit_all = False


@torch.no_grad()
def input_groups(layer, hidden, kwargs) -> list[list[str]]:
    """Linears of `layer` grouped by the input tensor they read, in call order."""
    order = []          # (name, input tensor): holding the tensors keeps their memory from being reused
    linears = _linears(layer)
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append((n, args[0])))
             for n, m in linears.items()]
    try:
        _one_sample(layer, hidden, kwargs)
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
def collect_hessians(layer, groups: list[list[str]], hidden, kwargs, device, replay: Replay,
                     min_tokens: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One Hessian per group, from its first Linear's inputs over all batches, and {group: tokens routed
    to it} for MoE experts' groups. Those routed fewer than `min_tokens` tokens take the Hessian of all
    the tokens the layer's experts receive instead (moe.all_token_stats)."""
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
    out = {name: a.result() for name, a in acc.items()}
    routed = {n: a.n for n, a in acc.items() if moe.EXPERT.match(n)}
    starved = [n for n, c in routed.items() if c < min_tokens]
    for n, (fallback, _) in moe.all_token_stats(layer, starved, hidden, kwargs, device, _run_layer, replay).items():
        out[n] = fallback.result()
    return out, routed


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
                                         cfg.static_groups, cfg.damp_percent, scale_dtype=getattr(torch, cfg.scale_dtype))
        info = {"loss": stats.loss, "rel_error": stats.rel_error, "damp": stats.damp}
    elif cfg.algorithm == "rtn":
        qw = rtn.quantize_weight(W, cfg.bits, cfg.group_size, cfg.sym, getattr(torch, cfg.scale_dtype))
        info = {} if H is None else {"rel_error": gptq.relative_error(W, qw.dequantize(), H)}
    else:
        raise QuantizationError(f"algorithm {cfg.algorithm!r} is not implemented in this driver")
    out, start = [], 0
    for m in linears:
        part = qw.rows(start, start + m.out_features)
        m.weight.data = part.dequantize(m.weight.dtype)
        out.append((part, info))
        start += m.out_features
    return out


# ---------------------------------------------------------------------------------------------
# AWQ: which op produced each group's input (the scale is folded into it), and which block's
# output scores a candidate scale.

QUERY_KEY = ("q_proj", "k_proj", "qkv_proj", "query", "key", "query_key_value", "Wqkv", "c_attn")
# A Linear group whose input is not a norm's output may take its scale from the Linear that feeds
# it channel for channel: v -> o (only without grouped-query attention: the shapes must match) and
# up -> down. Fused producers (Phi-3) feed it from their last rows: qkv's v part, gate_up's up part.
LINEAR_PRODUCERS = {"o_proj": (("v_proj", 1), ("qkv_proj", 3)), "down_proj": (("up_proj", 1), ("gate_up_proj", 2))}


@dataclass
class Smoothing:
    group: list[str]                 # Linears reading the scaled input
    prev: str                        # the module that produced it, where 1/s is folded in
    prev_is_norm: bool
    norm_offset: float = 0.0         # the norm multiplies by (offset + weight): 1 for Gemma's norms
    block: str | None = None         # module whose output scores a scale; None: the group's own output


def _norms(layer) -> dict[str, nn.Module]:
    return {n: m for n, m in layer.named_modules() if not isinstance(m, nn.Linear) and not list(m.children())
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1}


@torch.no_grad()
def _norm_offset(norm) -> float:
    """c in y = normalize(x) * (c + weight) (+ bias), measured: 0 for most norms, 1 for Gemma's."""
    saved = {k: v.detach().clone() for k, v in norm.named_parameters()}
    x = torch.randn(4, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
    try:
        for p in norm.parameters():
            p.zero_()
        y0 = norm(x).float()
        norm.weight.fill_(1.0)
        y1 = norm(x).float()
    finally:
        for k, p in norm.named_parameters():
            p.copy_(saved[k])
    return round((y0.abs().sum() / (y1 - y0).abs().sum().clamp(min=1e-30)).item(), 4)


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.no_grad()
def smoothing_plan(layer, groups: list[list[str]], hidden, kwargs) -> list[Smoothing]:
    """For each Linear group, the op its scale folds into, found by tensor identity (a norm whose
    output is the group's input) or by the v -> o / up -> down rule; groups with neither get none."""
    linears, norms = _linears(layer), _norms(layer)
    produced_by, group_input, keep = {}, {}, []

    def on_norm(name):
        def hook(_m, _a, out):
            keep.append(out)
            produced_by[id(out)] = name
        return hook

    def on_linear(name):
        def hook(_m, args):
            keep.append(args[0])
            group_input[name] = id(args[0])
        return hook

    hooks = [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    hooks += [linears[g[0]].register_forward_pre_hook(on_linear(g[0])) for g in groups]
    try:
        _one_sample(layer, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()
    plan = []
    for g in groups:
        in_f = linears[g[0]].in_features
        norm = produced_by.get(group_input.get(g[0]))
        if norm is not None and norms[norm].weight.shape[0] == in_f:
            plan.append(Smoothing(g, norm, True, _norm_offset(norms[norm]), _common_parent(g) or None))
            continue
        base, _, leaf = g[0].rpartition(".")
        for producer, parts in LINEAR_PRODUCERS.get(leaf, ()) if len(g) == 1 else ():
            name = f"{base}.{producer}" if base else producer
            if name in linears and linears[name].out_features == parts * in_f:
                plan.append(Smoothing(g, name, False))
                break
    return plan


def search_dtype(name: str, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with AMX (4x the float32 matmul rate there), else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    try:
        with open("/proc/cpuinfo") as f:
            amx = "amx_bf16" in f.read(1 << 16)
    except OSError:
        amx = False
    return torch.bfloat16 if amx else torch.float32


def _cast(v, dtype):
    if isinstance(v, torch.Tensor):
        return v.detach().to(dtype, copy=True) if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(_cast(x, dtype) for x in v)
    return v


@torch.no_grad()
def _capture_awq(layer, groups, plan, hidden, kwargs, dtype, search_tokens: int = 0):
    """One full forward of the layer: each group's Hessian and mean |x|, and the calls into each
    scored block (inputs cast to the search dtype) from the batches that start within the first
    `search_tokens` tokens (0: all). The scale search forwards its block once per candidate over
    these calls, so their number sets its cost (BENCHMARKS.md, "AWQ search tokens")."""
    linears = _linears(layer)
    acc = {g[0]: gptq.HessianAccumulator(linears[g[0]].in_features, hidden[0].device) for g in groups}
    absum = {g[0]: torch.zeros(linears[g[0]].in_features, device=hidden[0].device) for g in groups}
    calls = {sm.block: [] for sm in plan if sm.block is not None}

    def on_input(name):
        def hook(_m, args):
            acc[name].add(args[0])
            absum[name] += args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).sum(0)
        return hook

    recording = [True]

    def on_block(name):
        def hook(_m, args, kw):
            if recording[0]:
                calls[name].append((_cast(args, dtype), {k: _cast(v, dtype) for k, v in kw.items()}))
        return hook

    hooks = [linears[g[0]].register_forward_pre_hook(on_input(g[0])) for g in groups]
    hooks += [layer.get_submodule(b).register_forward_pre_hook(on_block(b), with_kwargs=True) for b in calls]
    seen = 0
    try:
        for h, kw in zip(hidden, kwargs):
            recording[0] = not search_tokens or seen < search_tokens
            _run_layer(layer, h, kw)
            seen += h.shape[0] * h.shape[1]
    finally:
        for h in hooks:
            h.remove()
    H = {n: a.result() for n, a in acc.items()}
    x_mean = {n: absum[n] / max(acc[n].n, 1) for n in acc}
    return H, x_mean, calls, {n: a.n for n, a in acc.items()}


class BlockLoss:
    """Mean squared difference of a block's output under candidate weights against its output
    under the current weights, on the recorded calls; the block is a copy in the search dtype."""

    def __init__(self, block: nn.Module, linear_names: list[str], calls, dtype):
        self.block = copy.deepcopy(block).to(dtype)
        self.linears = [self.block.get_submodule(n) for n in linear_names]
        self.calls, self.dtype = calls, dtype
        self.ref = [self._run(a, k) for a, k in calls]

    def _run(self, args, kw):
        out = self.block(*args, **kw)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def __call__(self, weights: list[torch.Tensor]) -> float:
        for m, w in zip(self.linears, weights):
            m.weight.data = w.to(self.dtype)
        total, count = 0.0, 0
        for (a, k), ref in zip(self.calls, self.ref):
            total = total + (self._run(a, k).float() - ref.float()).pow(2).sum()
            count += ref.numel()
        return float(total) / count


def hessian_loss(weights: list[torch.Tensor], H: torch.Tensor):
    """The same loss for a block that is the group itself, from H = 2/N X^T X without a forward."""
    W = torch.cat([w.float() for w in weights])

    def loss(cands: list[torch.Tensor]) -> float:
        E = torch.cat(cands) - W
        return (torch.sum((E @ H) * E) / (2 * W.shape[0])).item()
    return loss


@torch.no_grad()
def _fold(layer, sm: Smoothing, s: torch.Tensor, linears):
    """X / s in the producer, W * s in the group: the float model computes the same function."""
    for n in sm.group:
        w = linears[n].weight
        w.data = (w.float() * s.view(1, -1)).to(w.dtype)
    prev = layer.get_submodule(sm.prev)
    k = s.numel()
    if sm.prev_is_norm:
        prev.weight.data = ((sm.norm_offset + prev.weight.float()) / s - sm.norm_offset).to(prev.weight.dtype)
    else:
        prev.weight.data[-k:] = (prev.weight[-k:].float() / s.view(-1, 1)).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data[-k:] = (prev.bias[-k:].float() / s).to(prev.bias.dtype)


@torch.no_grad()
def quantize_layer_awq(layer, hidden, kwargs, cfg: QuantConfig, dtype: torch.dtype):
    """AWQ on one decoder layer in place: search and fold scales, clip, quantize.
    Returns ({Linear name: QuantizedWeight}, {Linear name: info})."""
    linears = _linears(layer)
    groups = input_groups(layer, hidden, kwargs)
    plan = smoothing_plan(layer, groups, hidden, kwargs)
    H, x_mean, calls, counts = _capture_awq(layer, groups, plan, hidden, kwargs, dtype, cfg.awq_search_tokens)
    info = {n: {} for n in linears}
    routed = {n: c for n, c in counts.items() if moe.EXPERT.match(n)}
    starved = [n for n, c in routed.items() if c < cfg.expert_min_tokens]
    for n, (acc, absum) in moe.all_token_stats(layer, starved, hidden, kwargs, hidden[0].device, _run_layer).items():
        H[n], x_mean[n] = acc.result(), absum / max(acc.n, 1)
    for g in groups:
        if g[0] in routed:
            for m in g:
                info[m].update(moe.expert_note(routed[g[0]], cfg.expert_min_tokens))
    for sm in plan:
        first = sm.group[0]
        weights = [linears[n].weight.float() for n in sm.group]
        if sm.block is not None:
            rel = [n[len(sm.block) + 1:] for n in sm.group]
            loss = BlockLoss(layer.get_submodule(sm.block), rel, calls.pop(sm.block), dtype)
        else:
            loss = hessian_loss(weights, H[first])
        found = awq.search_scale(x_mean[first], weights, cfg.bits, cfg.group_size, loss, cfg.awq_grid, cfg.awq_duo)
        del loss
        s = found.scale.to(H[first].device)
        _fold(layer, sm, s, linears)
        H[first] = H[first] / (s.view(-1, 1) * s.view(1, -1))
        for n in sm.group:
            info[n].update(scale_ratio=found.ratio, duo=found.duo, block_loss=found.loss,
                           identity_block_loss=found.identity_loss, folded_into=sm.prev)
    results = {}
    for g in groups:
        for n in g:
            if _kept(linears[n]):
                continue
            W = linears[n].weight.float()
            clip = cfg.awq_clip and n.rpartition(".")[2] not in QUERY_KEY
            qw = awq.quantize_weight(awq.search_clip(W, H[g[0]], cfg.bits, cfg.group_size) if clip else W,
                                     cfg.bits, cfg.group_size, getattr(torch, cfg.scale_dtype))
            Q = qw.dequantize()
            info[n]["rel_error"] = gptq.relative_error(W, Q, H[g[0]])
            linears[n].weight.data = Q.to(linears[n].weight.dtype)
            results[n] = qw
    return results, info


def _layer_state(layer, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's tensors outside its Linears (norms): AWQ changes them, a resume restores them."""
    lin = {f"{n}.{p}" for n in _linears(layer) for p in ("weight", "bias")}
    return {f"{prefix}.{k}": v for k, v in layer.state_dict().items() if k not in lin}


@torch.no_grad()
def quantize_model(model, tokens: torch.Tensor | None, cfg: QuantConfig, device="cpu", checkpoint_dir=None,
                   recipe: dict | None = None, on_layer: Callable[[LayerReport, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, replay_bytes: int = 4 * 2 ** 30,
                   on_group: Callable[[int, list[str], torch.Tensor, torch.Tensor, dict], None] | None = None):
    """Quantize every Linear inside the decoder layers of `model` (in place: their weights become
    the dequantized values). lm_head and embeddings stay 16-bit.

    Returns ({full module name: QuantizedWeight}, [LayerReport]). `tokens` [n, seq] are the
    calibration blocks (None for rtn). With `checkpoint_dir` the run resumes from completed layers.
    `replay_bytes` bounds the memory spent on replaying frozen modules' outputs (replay.py).
    `on_group(layer, names, W, H, info)` sees each GPTQ group's float weight and Hessian (bench/gpu.py
    checks them against the reference loop).
    """
    device = torch.device(device)
    moe.unfuse_experts(model)              # fused 3-D experts become per-expert Linears (in place)
    mark_kept(model, cfg.keep)
    layers = decoder_layers(model)
    prefix = _module_names(model, layers)
    block_dtype = search_dtype(cfg.search_dtype, device) if cfg.algorithm == "awq" else None
    needs_data = cfg.algorithm != "rtn"
    if needs_data and tokens is None:
        raise QuantizationError(f"{cfg.algorithm} needs calibration tokens")
    ckpt = LayerCheckpoint(checkpoint_dir, recipe or cfg.key()) if checkpoint_dir else None
    start = ckpt.layers_done() if ckpt else 0
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i in range(start):      # resume: completed layers take their stored weights and norms
        res, rep, state = ckpt.load_layer(i)
        for name, qw in res.items():
            model.get_submodule(name).weight.data = qw.dequantize(model.get_submodule(name).weight.dtype)
        if model.load_state_dict(state, strict=False).unexpected_keys:
            raise QuantizationError(f"checkpoint layer {i} does not match the model; remove {checkpoint_dir}")
        results.update(res)
        reports.append(LayerReport(**rep))

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
        if cfg.algorithm == "awq":
            res, report.modules = quantize_layer_awq(layer, hidden, kwargs, cfg, block_dtype)
            layer_results = {f"{prefix[i]}.{n}": qw for n, qw in res.items()}
            hidden = [_run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
        elif needs_data:
            groups = [g for g in ([n for n in g if not _kept(linears[n])] for g in input_groups(layer, hidden, kwargs))
                      if g]
            stages = moe.stages(groups) if cfg.true_sequential else [groups]
            replay = Replay(layer, len(hidden), replay_bytes)
            try:
                for stage in stages:
                    Hs, routed = collect_hessians(layer, stage, hidden, kwargs, device, replay, cfg.expert_min_tokens)
                    for g in stage:
                        W = torch.cat([linears[n].weight.float() for n in g]) if on_group else None
                        for n, (qw, info) in zip(g, quantize_group([linears[n] for n in g], Hs[g[0]], cfg)):
                            layer_results[f"{prefix[i]}.{n}"] = qw
                            report.modules[n] = info
                            if g[0] in routed:
                                info.update(moe.expert_note(routed[g[0]], cfg.expert_min_tokens))
                        if on_group:
                            on_group(i, g, W, Hs[g[0]], info)
                        replay.freeze(linears[n] for n in g)
                    del Hs
                hidden = run_layer_batches(layer, hidden, kwargs, replay)
            finally:
                replay.close()
        else:
            for n, m in linears.items():
                if _kept(m):
                    continue
                (qw, info), = quantize_group([m], None, cfg)
                layer_results[f"{prefix[i]}.{n}"] = qw
                report.modules[n] = info
        layer.to(home)
        layer_results = {k: QuantizedWeight(v.codes.cpu(), v.scales.cpu(), v.zeros.cpu(), v.g_idx.cpu(),
                                            v.bits, v.group_size, v.sym) for k, v in layer_results.items()}
        report.seconds = time.perf_counter() - t0
        if ckpt:
            ckpt.save(i, layer_results, report.__dict__, hidden or [], _layer_state(layer, prefix[i]))
        results.update(layer_results)
        reports.append(report)
        if on_layer:
            on_layer(report, len(layers))
    return results, reports
