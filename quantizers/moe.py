"""Mixture-of-experts layers as one Linear per expert, and their checkpoint names.

transformers 5 holds a layer's experts fused in 3-D parameters (gate_up_proj [E, 2I, H], down_proj
[E, H, I], `use_experts_implementation`), which no Linear hook sees. Checkpoints (and vLLM's and
transformers' MoE loaders) store them one Linear per expert: `mlp.experts.{e}.gate_proj` for Qwen-style
models, `block_sparse_moe.experts.{e}.w1` for Mixtral-style ones. `unfuse_experts` swaps each fused
experts module for `UnfusedExperts`, the same computation made of per-expert nn.Linears, so the layer
walk (walk.py) quantizes experts like any Linear, each from the tokens routed to it; `checkpoint_renamer`
maps the per-expert names to the ones the model family's checkpoints use, from transformers' own
conversion mapping for that family.
"""
import re
from functools import partial
from types import SimpleNamespace

import torch
from torch import nn

from core.errors import NotImplementedFeature

from .gptq import HessianAccumulator

ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")   # routing Linears: they stay 16-bit


def is_fused_experts(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "down_proj", None), nn.Parameter) and mod.down_proj.dim() == 3


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE layer as `experts.{e}.{gate_proj,up_proj,down_proj}` Linears, computing
    what the fused module's eager loop computes: each routed token through its experts, weighted by
    the router and summed. `visit_all` runs every expert (on all tokens, output discarded) so that a
    grouping pass meets every expert's Linears, routed or not."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        if getattr(fused, "has_post_expert_norm", False) or not getattr(fused, "has_gate", True):
            raise NotImplementedFeature(f"{type(fused).__name__}: experts without a gate projection or with a "
                                        "post-expert norm are not supported yet")
        # the family's gating (act(gate) * up by default), bound to a copy of the plain attributes it
        # reads: binding it to `fused` would keep the fused 3-D weights alive
        state = SimpleNamespace(**{k: v for k, v in vars(fused).items() if not k.startswith("_")},
                                act_fn=getattr(fused, "act_fn", None))
        self.gate_fn = partial(type(fused)._apply_gate, state)
        self.interleaved = not getattr(fused, "is_concatenated", True)
        transposed = getattr(fused, "is_transposed", False)
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        gu_bias = getattr(fused, "gate_up_proj_bias", None)
        d_bias = getattr(fused, "down_proj_bias", None)
        inter = gate_up.shape[1] // 2
        rows = (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else (slice(0, inter), slice(inter, None))
        for e in range(down.shape[0]):
            mlp = nn.Module()
            for name, w, b in (("gate_proj", gate_up[e][rows[0]], None if gu_bias is None else gu_bias[e][rows[0]]),
                               ("up_proj", gate_up[e][rows[1]], None if gu_bias is None else gu_bias[e][rows[1]]),
                               ("down_proj", down[e], None if d_bias is None else d_bias[e])):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
                lin.weight.data = w.contiguous().clone()
                if b is not None:
                    lin.bias.data = b.contiguous().clone()
                setattr(mlp, name, lin)
            self.append(mlp)
        self.visit_all = False

    @property
    def num_experts(self) -> int:
        return len(self)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's gated intermediate: what its down_proj reads."""
        g, u = self[e].gate_proj(x), self[e].up_proj(x)
        return self.gate_fn(torch.stack((g, u), -1).flatten(-2) if self.interleaved else torch.cat((g, u), -1))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in range(len(self)):
            token, pos = torch.where(top_k_index == e)
            if self.visit_all:
                self[e].down_proj(self.gate_up(e, hidden_states))
            if token.numel() == 0:
                continue
            y = self[e].down_proj(self.gate_up(e, hidden_states[token])) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


@torch.no_grad()
def unfuse_experts(model) -> int:
    """Replace every fused experts module of `model` by UnfusedExperts (in place); returns how many.
    Each replacement is checked against the module it replaces on random routed tokens, so a family
    whose experts compute differently is refused instead of quantized wrongly."""
    fused = [(name, mod) for name, mod in model.named_modules() if is_fused_experts(mod)]
    for name, mod in fused:
        new = UnfusedExperts(mod)
        _check_same(mod, new, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(fused)


def _check_same(fused, unfused, name: str):
    if unfused[0].gate_proj.weight.is_meta:          # shapes only (the API's preflight): nothing to run
        return
    hidden = unfused[0].gate_proj.in_features
    w = unfused[0].gate_proj.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, hidden, generator=g).to(w.device, w.dtype)
    k = min(2, unfused.num_experts)
    idx = torch.stack([torch.randperm(unfused.num_experts, generator=g)[:k] for _ in range(16)]).to(w.device)
    wts = torch.rand(16, k, generator=g).to(w.device, w.dtype)
    saved = getattr(fused.config, "_experts_implementation", None) if hasattr(fused, "config") else None
    try:
        if saved is not None:
            fused.config._experts_implementation = "eager"
        ref = fused(x, idx, wts)
    finally:
        if saved is not None:
            fused.config._experts_implementation = saved
    got = unfused(x, idx, wts)
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    if not torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item()):
        raise NotImplementedFeature(f"{name} ({type(fused).__name__}): its experts do not compute like the standard "
                                    "per-expert loop (act(gate) * up, then down, weighted by the router), so quantfarm "
                                    "cannot quantize them per expert yet")


def has_experts(names) -> bool:
    """Whether module or tensor names (a model's, or a checkpoint's) hold per-expert weights."""
    return any(".experts." in n for n in names)


def is_router(name: str) -> bool:
    return name.rpartition(".")[2] in ROUTER_LEAVES


def linear_shapes(module: nn.Module) -> set[tuple[int, int]]:
    """(in, out) of every weight matrix under `module` that is quantized: its Linears but routers, and
    the per-expert matrices of fused experts (what unfuse_experts makes of them)."""
    shapes = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not is_router(name):
            shapes.add((m.in_features, m.out_features))
        elif is_fused_experts(m):
            gate_up, down = m.gate_up_proj, m.down_proj
            if getattr(m, "is_transposed", False):
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            shapes |= {(gate_up.shape[2], gate_up.shape[1] // 2), (down.shape[2], down.shape[1])}
    return shapes


# ---------------------------------------------------------------------------------------------------
# calibration: stages and starved experts

EXPERT = re.compile(r"^(?P<block>.*experts)\.(?P<e>\d+)\.(?P<leaf>\w+)$")


def stages(groups: list[list[str]]) -> list[list[list[str]]]:
    """True-sequential stages: each group alone, except that the experts of a layer do not feed one
    another, so all their gate/up groups form one stage (one forward) and all their down groups the next."""
    out, where = [], {}
    for g in groups:
        m = EXPERT.match(g[0])
        if m is None:
            out.append([g])
            continue
        key = (m["block"], m["leaf"] == "down_proj")
        if key in where:
            out[where[key]].append(g)
        else:
            where[key] = len(out)
            out.append([g])
    return out


def expert_note(tokens: int, min_tokens: int) -> dict:
    """What an expert Linear's report entry says about its statistics."""
    return {"routed_tokens": tokens,
            "statistics": "routed tokens" if tokens >= min_tokens else
            f"all tokens of the layer (routed {tokens} < {min_tokens})"}


def summary(reports) -> dict | None:
    """Experts quantized and how many took the layer's tokens: the report's MoE line (None: no experts)."""
    notes = [v for r in reports for n, v in r.modules.items() if EXPERT.match(n)]
    if not notes:
        return None
    return {"expert_linears": len(notes),
            "all_token_fallback": sum(not v.get("statistics", "").startswith("routed") for v in notes)}


class _Stop(Exception):
    pass


@torch.no_grad()
def all_token_stats(layer, names: list[str], hidden, kwargs, device, run, replay=None):
    """For expert Linears that saw too few routed tokens: their input statistics over every token the
    layer's experts receive (gate/up: the experts' input; down: the expert's own gate and up applied to
    it). One forward per batch, stopped at the experts. Returns {name: (Hessian accumulator, sum |x|)}."""
    if not names:           # dense layers, or every expert well fed: no forward at all
        return {}
    wanted: dict[str, list[tuple[int, str, str]]] = {}
    for n in names:
        m = EXPERT.match(n)
        wanted.setdefault(m["block"], []).append((int(m["e"]), m["leaf"], n))
    stats = {}

    def hook(block):
        def pre(mod, args, kw):
            x = (args[0] if args else kw["hidden_states"]).reshape(-1, mod[0].gate_proj.in_features)
            for e, leaf, n in wanted[block]:
                xe = x if leaf != "down_proj" else mod.gate_up(e, x)
                acc, absum = stats.setdefault(n, (HessianAccumulator(xe.shape[-1], device),
                                                  torch.zeros(xe.shape[-1], device=device)))
                acc.add(xe)
                absum += xe.abs().float().sum(0)
            raise _Stop
        return pre

    hooks = [layer.get_submodule(b).register_forward_pre_hook(hook(b), with_kwargs=True) for b in wanted]
    if replay is not None:
        saved, replay.recording_on = replay.recording_on, False
    try:
        for b, (h, kw) in enumerate(zip(hidden, kwargs)):
            if replay is not None:
                replay.batch = b
            try:
                run(layer, h, kw)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
        if replay is not None:
            replay.recording_on = saved
    return stats


# ---------------------------------------------------------------------------------------------------
# checkpoint names

def _leaf(pattern: str) -> str:
    """'.experts.*.w1.weight' -> 'w1'."""
    return [p for p in pattern.split(".") if p and p not in ("*", "weight")][-1]


def checkpoint_renamer(model):
    """A function mapping an in-memory tensor name of the (unfused) model to the name the family's
    checkpoints use, read from transformers' conversion mapping for the model type: the per-expert
    Linear names (Mixtral: w1/w3/w2) and the block renames (Mixtral: .mlp. -> .block_sparse_moe.).
    None when the model needs no renaming."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        mapping = get_model_conversion_mapping(model, add_legacy=False) or []
    except (ImportError, AttributeError, KeyError, TypeError):
        return None
    leaves, renames = {}, []
    for conv in mapping:
        if isinstance(conv, WeightConverter):
            sources, targets = list(conv.source_patterns), list(conv.target_patterns)
            if any(t.endswith("experts.gate_up_proj") for t in targets) and len(sources) == 2:
                leaves["gate_proj"], leaves["up_proj"] = _leaf(sources[0]), _leaf(sources[1])
            elif any(t.endswith("experts.down_proj") for t in targets) and len(sources) == 1:
                leaves["down_proj"] = _leaf(sources[0])
        elif isinstance(conv, WeightRenaming):
            for src, tgt in zip(conv.source_patterns, conv.target_patterns):
                if re.fullmatch(r"[\w.]+", src) and re.fullmatch(r"[\w.]+", tgt):   # plain substring renames
                    renames.append((tgt, src))                                      # reversed: model -> file
    leaves = {k: v for k, v in leaves.items() if k != v}
    if not leaves and not renames:
        return None
    expert = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(?=\.|$)")

    def rename(key: str) -> str:
        key = expert.sub(lambda m: m.group(1) + leaves.get(m.group(2), m.group(2)), key)
        for new, old in renames:
            key = key.replace(new, old)
        return key
    return rename
