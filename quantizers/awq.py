"""AWQ (Lin et al., 2023): activation-aware weight quantization, as pure tensor functions.

Per group of Linears sharing one input X (and the op before them that produced X):

1. scale search: s = mean|X|^r (optionally divided by the weights' own normalised magnitude,
   "duo" scaling, ^(1-r)), for r on a grid; each candidate is scored by the caller's block loss on
   Q(W * s) / s, the block being whatever the scale affects (attention, MLP or a single Linear);
   the best s is folded into the previous op by awq_layer.py (X / s there, W * s here);
2. clipping search per output channel and group: shrink the group's range while the group's
   output error e^T H_g e (H = X^T X) falls;
3. zero-point group quantization on the group's own min and max (../shared/FORMATS.md §2).

awq_layer.py knows which modules form the blocks; nothing here knows about models.
"""
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .grid import SCALE_MIN, QuantizedWeight, group_index
from .scheme import Scheme


def _group_width(in_features: int, group_size: int) -> int:
    gs = in_features if group_size == -1 else group_size
    if in_features % gs:
        raise ValueError(f"AWQ needs in_features ({in_features}) to be a multiple of the group size ({gs})")
    return gs


def zero_point_grid(Wg: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16):
    """Scale and zero for each row of Wg [..., gs]: scale = (max - min) / maxq rounded to the
    checkpoint's scale dtype, zero = clamp(-round(min / scale), 0, maxq)."""
    maxq = 2 ** bits - 1
    xmax, xmin = Wg.amax(-1), Wg.amin(-1)
    scale = ((xmax - xmin).clamp(min=1e-5) / maxq).to(scale_dtype).float().clamp(min=SCALE_MIN)
    zero = (-torch.round(xmin / scale)).clamp(0, maxq)
    return scale, zero


def fake_quantize(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W [out, in] rounded onto its zero-point group grid and returned dequantized (float32)."""
    out_f, in_f = W.shape
    Wg = W.float().reshape(out_f, -1, _group_width(in_f, group_size))
    scale, zero = zero_point_grid(Wg, bits)
    q = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    return ((q - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)


def quantize_weight(W: torch.Tensor, q: Scheme) -> QuantizedWeight:
    """The final zero-point quantization of (already scaled and clipped) W [out, in] onto `q` (its sym
    is not read: AWQ's grid always has zero points)."""
    bits, group_size, scale_dtype = q.bits, q.group_size, q.scale_torch_dtype
    out_f, in_f = W.shape
    Wg = W.float().reshape(out_f, -1, _group_width(in_f, group_size))
    scale, zero = zero_point_grid(Wg, bits, scale_dtype)
    q = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    return QuantizedWeight(q.reshape(out_f, in_f).to(torch.uint8), scale.t().contiguous(),
                           zero.t().to(torch.int32).contiguous(), group_index(in_f, group_size, W.device),
                           bits, group_size, sym=False)


def weight_mean(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's max: the "duo" weight magnitude [in]."""
    out_f, in_f = W.shape
    a = W.float().abs().reshape(out_f, -1, _group_width(in_f, group_size))
    a = a / (a.amax(-1, keepdim=True) + 1e-6)
    return a.reshape(out_f, in_f).mean(0)


def search_grid(n_grid: int = 20, duo: str = "duo") -> list[tuple[float, bool]]:
    """(ratio, duo) candidates, always with (0, False), the identity scale, so the search never does
    worse than plain rounding. "duo": the identity plus n_grid - 1 duo-scaled ratios on [0, 1] (the
    default: on SmolLM2 its finer ratio steps beat "both", n_grid // 2 ratios with and without duo
    scaling, by 0.6 perplexity; BENCHMARKS.md); "plain": activation scaling only."""
    if duo == "both":
        n = max(n_grid // 2, 2)
        return [(i / (n - 1), d) for i in range(n) for d in (False, True)]
    if duo == "duo":
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    if duo == "plain":
        return [(i / (n_grid - 1), False) for i in range(n_grid)]
    raise ValueError(f"AWQ grid {duo!r}: one of duo, both, plain")


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool) -> torch.Tensor:
    s = x_mean.pow(ratio)
    if duo:
        s = s / (w_mean.pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class ScaleSearch:
    scale: torch.Tensor      # [in], float32
    ratio: float
    duo: bool
    loss: float              # block loss at the chosen scale
    identity_loss: float     # block loss with s = 1 (plain rounding)


def search_scale(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], q: Scheme,
                 block_loss: Callable[[list[torch.Tensor]], float], n_grid: int = 20,
                 duo: str = "duo") -> ScaleSearch:
    """The per-input-channel scale minimising block_loss([Q(W_i * s) / s for each W_i])."""
    bits, group_size = q.bits, q.group_size
    x_mean = x_mean.float()
    w_mean = weight_mean(torch.cat([w.float() for w in weights]), group_size)
    best, identity = None, None
    for ratio, d in search_grid(n_grid, duo):
        s = candidate_scale(x_mean, w_mean, ratio, d)
        loss = block_loss([fake_quantize(w.float() * s, bits, group_size) / s for w in weights])
        if ratio == 0 and not d:
            identity = loss
        if loss == loss and (best is None or loss < best.loss):     # loss == loss: skip NaN
            best = ScaleSearch(s, ratio, d, loss, float("nan"))
    if best is None:
        raise FloatingPointError("AWQ scale search: every candidate gave a non-finite loss")
    best.identity_loss = identity if identity is not None else float("nan")
    return best


def diagonal_blocks(H: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [G, gs, gs] blocks on the diagonal of H [in, in]: what one group's inputs see."""
    n = H.shape[0]
    gs = _group_width(n, group_size)
    G = n // gs
    return H.reshape(G, gs, G, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(W: torch.Tensor, H: torch.Tensor, q: Scheme, n_grid: int = 20,
                max_shrink: float = 0.5, rows_per_chunk: int = 4096) -> torch.Tensor:
    """W [out, in] with each (row, group) clamped to the symmetric range ±m that minimises the
    group's output error e^T H_g e after quantization, m shrinking from max|w| in 1/n_grid steps."""
    bits, group_size = q.bits, q.group_size
    out_f, in_f = W.shape
    gs = _group_width(in_f, group_size)
    Hd = diagonal_blocks(H.float(), group_size)                     # [G, gs, gs]
    result = torch.empty_like(W, dtype=torch.float32)
    for r0 in range(0, out_f, rows_per_chunk):
        Wg = W[r0:r0 + rows_per_chunk].float().reshape(-1, in_f // gs, gs)   # [rows, G, gs]
        m0 = Wg.abs().amax(-1, keepdim=True)
        best_m, best_err = m0.clone(), torch.full(m0.shape[:2], float("inf"), device=W.device)
        for i in range(int(max_shrink * n_grid)):
            m = m0 * (1 - i / n_grid)
            Wc = torch.clamp(Wg, -m, m)
            E = fake_quantize(Wc.reshape(-1, in_f), bits, group_size).reshape(Wg.shape) - Wg
            Et = E.transpose(0, 1)                                   # [G, rows, gs]
            err = ((Et @ Hd) * Et).sum(-1).t()                      # e^T H_g e per (row, group)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better[..., None], m, best_m)
        result[r0:r0 + rows_per_chunk] = torch.clamp(Wg, -best_m, best_m).reshape(-1, in_f)
    return result
