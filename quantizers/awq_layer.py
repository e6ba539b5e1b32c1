"""AWQ's layer step: one full forward of the layer (Hessians, mean |x| and the calls into each scored
block), then a scale searched per group of Linears sharing an input and folded into the op that
produced that input (a norm, found by tensor identity, or v -> o / up -> down), then clipping and
quantization. awq.py holds the math, this file the model plumbing."""
import copy
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from . import awq, gptq, moe
from .config import QuantConfig
from .layers import StepOptions, input_groups, is_kept, layer_linears, one_sample, run_layer
from .scheme import ActOrder, Scheme

NEEDS_DATA = True
SYM_DEFAULT, SYM_FIXED = False, True        # zero points only
ACT_ORDER_DEFAULT = ActOrder.NONE
# The knobs a job may set (JobSpec fields, QuantConfig fields of the same names); left out of a recipe at
# their defaults, so the recipe keys of jobs made before they could be set stay valid.
KNOBS = {
    "awq_grid": (int, Field(20, ge=2, le=200, description="awq: scale-search candidates per group of Linears")),
    "awq_duo": (Literal["duo", "both", "plain"], Field("duo", description="awq: the candidates: duo (identity and "
                "duo-scaled ratios), both (half each) or plain (AutoAWQ's ratios)")),
    "awq_clip": (bool, Field(True, description="awq: search a clipping range per group before quantizing")),
    "search_dtype": (Literal["auto", "float32", "bfloat16"], Field("auto", description="awq: the dtype of the "
                     "scale search's block forwards (auto: bfloat16 where it is fast, else float32)")),
    "awq_search_tokens": (int, Field(8192, ge=0, le=10_000_000, description="awq: candidates are scored on the "
                          "first batches up to this many tokens (0: all); statistics use every token")),
}


def problems(q: Scheme, shapes) -> list[str]:
    """Settings AWQ cannot run with, whatever the format."""
    out = []
    if q.weight_type != "int":
        out.append(f"AWQ onto {q.weight_type} weights ({q.named}) is not implemented; --algorithm rtn rounds them")
    if q.sym:
        out.append("sym: AWQ quantizes with zero points; leave sym unset (or false) with algorithm awq")
    if q.act_order != ActOrder.NONE:
        out.append("act-order applies to GPTQ only")
    if q.ragged_widths(shapes):
        out.append(f"AWQ needs every input width to be a multiple of the group size (widths "
                   f"{q.ragged_widths(shapes)} are not multiples of {q.group_size}; try 64 or 32)")
    return out


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
    linears, norms = layer_linears(layer), _norms(layer)
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
        one_sample(layer, hidden, kwargs)
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
    """bfloat16 on CUDA and on CPUs with bfloat16 matmul instructions (AMX: 4x the float32 rate; AVX512-BF16:
    1.6x on SmolLM2's search, same perplexity, BENCHMARKS.md), else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_bf16_matmul() else torch.float32


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
    """Read once per process (the step asks for every layer)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16).split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
    linears = layer_linears(layer)
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
            run_layer(layer, h, kw)
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
def quantize_layer(layer, hidden, kwargs, cfg: QuantConfig, opts: StepOptions):
    """AWQ on one decoder layer in place: search and fold scales, clip, quantize. Returns ({Linear name:
    QuantizedWeight}, {Linear name: info}, the layer's outputs: the next layer's inputs)."""
    dtype = search_dtype(cfg.search_dtype, opts.device)
    linears = layer_linears(layer)
    groups = input_groups(layer, hidden, kwargs)
    plan = smoothing_plan(layer, groups, hidden, kwargs)
    H, x_mean, calls, counts = _capture_awq(layer, groups, plan, hidden, kwargs, dtype, cfg.awq_search_tokens)
    info = {n: {} for n in linears}
    routed = {n: c for n, c in counts.items() if moe.EXPERT.match(n)}
    starved = [n for n, c in routed.items() if c < cfg.expert_min_tokens]
    for n, (acc, absum) in moe.all_token_stats(layer, starved, hidden, kwargs, hidden[0].device, run_layer).items():
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
        found = awq.search_scale(x_mean[first], weights, cfg.scheme, loss, cfg.awq_grid, cfg.awq_duo)
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
            if is_kept(linears[n]):
                continue
            W = linears[n].weight.float()
            clip = cfg.awq_clip and n.rpartition(".")[2] not in QUERY_KEY
            qw = awq.quantize_weight(awq.search_clip(W, H[g[0]], cfg.scheme) if clip else W, cfg.scheme)
            Q = qw.dequantize()
            info[n]["rel_error"] = gptq.relative_error(W, Q, H[g[0]])
            linears[n].weight.data = Q.to(linears[n].weight.dtype)
            results[n] = qw
    return results, info, [run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
