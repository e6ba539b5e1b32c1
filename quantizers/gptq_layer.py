"""GPTQ's layer step: Linears grouped by the input they read share one Hessian and are quantized as
one row-concatenated matrix (gptq.py). With true_sequential each group is quantized before the
inputs of the next group are collected, so o_proj sees the output of the quantized q/k/v, and so on;
the forward stops early (StopForward) once the group being collected has seen its input, and frozen
modules' outputs are replayed instead of recomputed (replay.py)."""
import torch
from torch import nn

from . import gptq, moe
from .config import QuantConfig
from .layers import StepOptions, StopForward, input_groups, is_kept, layer_linears, run_layer, split_rows
from .replay import Replay
from .scheme import ActOrder, Scheme

NEEDS_DATA = True
SYM_DEFAULT, SYM_FIXED = True, False
ACT_ORDER_DEFAULT = ActOrder.STATIC
KNOBS: dict = {}


def problems(q: Scheme, shapes) -> list[str]:
    """Settings GPTQ itself cannot run with: any integer grid and act-order, but no float grid yet."""
    if q.weight_type != "int":
        return [f"GPTQ onto {q.weight_type} weights ({q.named}) is not implemented; --algorithm rtn rounds them "
                "(as llm-compressor's FP8_DYNAMIC does)"]
    return []


@torch.no_grad()
def collect_hessians(layer, groups: list[list[str]], hidden, kwargs, device, replay: Replay,
                     min_tokens: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One Hessian per group, from its first Linear's inputs over all batches, and {group: tokens routed
    to it} for MoE experts' groups. Those routed fewer than `min_tokens` tokens take the Hessian of all
    the tokens the layer's experts receive instead (moe.all_token_stats)."""
    linears = layer_linears(layer)
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
                run_layer(layer, h, kw)
            except StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    replay.end_pass()
    out = {name: a.result() for name, a in acc.items()}
    routed = {n: a.n for n, a in acc.items() if moe.EXPERT.match(n)}
    starved = [n for n, c in routed.items() if c < min_tokens]
    for n, (fallback, _) in moe.all_token_stats(layer, starved, hidden, kwargs, device, run_layer, replay).items():
        out[n] = fallback.result()
    return out, routed


def run_layer_batches(layer, hidden, kwargs, replay: Replay) -> list[torch.Tensor]:
    """The layer's outputs for every batch: the next layer's inputs (nothing new is recorded)."""
    replay.recording_on = False
    out = []
    for b, (h, kw) in enumerate(zip(hidden, kwargs)):
        replay.batch = b
        out.append(run_layer(layer, h, kw))
    return out


def quantize_group(linears: list[nn.Linear], H: torch.Tensor, cfg: QuantConfig):
    """GPTQ on Linears sharing one input, as one stacked matrix: each Linear's weight becomes its
    dequantized result; returns [(QuantizedWeight, info)] per Linear."""
    W = torch.cat([m.weight.float() for m in linears])
    qw, stats = gptq.quantize_weight(W, H, cfg.scheme, cfg.damp_percent)
    return split_rows(linears, qw, {"loss": stats.loss, "rel_error": stats.rel_error, "damp": stats.damp})


@torch.no_grad()
def quantize_layer(layer, hidden, kwargs, cfg: QuantConfig, opts: StepOptions):
    """GPTQ on one decoder layer in place. Returns ({Linear name: QuantizedWeight}, {Linear name: info},
    the layer's outputs: the next layer's inputs)."""
    linears = layer_linears(layer)
    groups = [g for g in ([n for n in g if not is_kept(linears[n])] for g in input_groups(layer, hidden, kwargs)) if g]
    stages = moe.stages(groups) if cfg.true_sequential else [groups]
    results, info = {}, {}
    replay = Replay(layer, len(hidden), opts.replay_bytes)
    try:
        for stage in stages:
            Hs, routed = collect_hessians(layer, stage, hidden, kwargs, opts.device, replay, cfg.expert_min_tokens)
            for g in stage:
                W = torch.cat([linears[n].weight.float() for n in g]) if opts.on_group else None
                for n, (qw, i) in zip(g, quantize_group([linears[n] for n in g], Hs[g[0]], cfg)):
                    results[n], info[n] = qw, i
                    if g[0] in routed:
                        i.update(moe.expert_note(routed[g[0]], cfg.expert_min_tokens))
                if opts.on_group:
                    opts.on_group(g, W, Hs[g[0]], info[g[-1]])
                replay.freeze(linears[n] for n in g)
            del Hs
        return results, info, run_layer_batches(layer, hidden, kwargs, replay)
    finally:
        replay.close()
