"""GPTQ (Frantar et al., 2022) as one pure function: quantize W column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian.

Notation: W [out, in] (an nn.Linear weight), H = 2/N * X^T X [in, in] over the N calibration rows of
the Linear's input. Rows of W are independent given H, so Linears that share an input (q/k/v,
gate/up) are quantized as one row-concatenated matrix with one Hessian.
"""
from dataclasses import dataclass

import torch

from core.errors import QuantizationError

from .grid import QuantizedWeight, grid_params, group_count, quantize_codes
from .scheme import Scheme

DAMP_STEP = 0.01   # added to damp_percent each time the Cholesky factorisation fails
DAMP_MAX = 1.0
HESSIAN_BLOCKS = 4


@dataclass
class GPTQStats:
    loss: float          # sum over rows of the GPTQ objective, (w - q)^2 / d^2 / 2
    rel_error: float     # tr(E H E^T) / tr(W H W^T): relative output error on the calibration inputs
    damp: float          # the damping that made H positive definite


def hessian_inverse_factor(H: torch.Tensor, damp_percent: float):
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it factorises."""
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, damp
        damp = (damp if damp > 0 else 0.0) + DAMP_STEP
        if damp > DAMP_MAX + 1e-9:
            raise QuantizationError(
                "GPTQ: the Hessian is not positive definite even with damping 1.0; the calibration data "
                "probably does not exercise this layer (use more or more varied samples)")


def quantize_weight(W: torch.Tensor, H: torch.Tensor, q: Scheme = Scheme(), damp_percent: float = 0.01,
                    kernel: str = "auto") -> tuple[QuantizedWeight, GPTQStats]:
    """GPTQ-quantize W [out, in] against H [in, in] onto the grid `q`. Returns the quantized weight and
    its statistics.

    Act-order processes columns by descending diag(H); dynamic forms groups in that order (non-monotonic
    g_idx), static takes every group's grid from the unmodified weights in natural order, so g_idx stays
    c // group_size. Dead inputs (diag(H) == 0) get zero weights.
    kernel: "auto" runs the column loop as one Triton kernel per block on CUDA and in torch
    elsewhere; "torch" or "triton" forces one (Triton on CPU tensors needs TRITON_INTERPRET=1).
    """
    bits, group_size, sym, scale_dtype = q.bits, q.group_size, q.sym, q.scale_torch_dtype
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    W0 = W.clone()
    H0 = H.clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if q.static_groups and group_size != -1:
        static = [grid_params(W[:, g * gs:(g + 1) * gs], bits, sym, scale_dtype) for g in range(group_count(in_f, gs))]

    perm = torch.argsort(torch.diag(H), descending=True) if q.desc_act else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = hessian_inverse_factor(H, damp_percent)
    Hinv = Hinv.contiguous()             # the factor may come column-major; both loops read rows of it
    del H

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    g_idx = torch.zeros(in_f, dtype=torch.int32, device=W.device)
    made = []                      # (scale, zero) in group creation order
    if group_size == -1:
        made.append(grid_params(W, bits, sym, scale_dtype))
    orig = perm if perm is not None else torch.arange(in_f, device=W.device)
    if kernel == "triton" or (kernel == "auto" and W.is_cuda):
        from .gptq_triton import quantize_block
    else:
        quantize_block = _block_torch
    loss = _column_blocks(W, Hinv, codes, made, static, orig, bits, gs if group_size != -1 else -1, sym, scale_dtype,
                          quantize_block)

    if static is not None:
        made = static
        g_idx = torch.arange(in_f, dtype=torch.int32, device=W.device) // gs
    elif group_size != -1:
        g_idx[orig] = torch.arange(in_f, dtype=torch.int32, device=W.device) // gs
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]

    scales = torch.stack([s for s, _ in made])
    zeros = torch.stack([z for _, z in made]).to(torch.int32)
    qw = QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym)
    return qw, GPTQStats(loss=loss.item(), rel_error=relative_error(W0, qw.dequantize(), H0), damp=damp)


def block_width(gs: int) -> int:
    """Columns per block, the same in both loops. A group never starts inside a block, so each
    group's grid comes from columns with all earlier errors applied. Both column loops (torch and
    Triton) use this one partition, so they round the same float32 operations in the same order.
    More than 256 columns do not fit the kernel's registers: wider groups span several blocks."""
    if gs == -1:
        return 128
    if gs <= 256:
        return gs
    return max(d for d in range(1, 129) if gs % d == 0)


def _column_blocks(W, Hinv, codes, made, static, orig, bits, gs, sym, scale_dtype, quantize_block):
    """The lazy-batch loop: each block's columns are quantized one by one by `quantize_block`
    (_block_torch, or the Triton kernel), then the block's errors reach the later columns in one
    matrix product. Fills `codes` and `made`; returns the GPTQ loss."""
    in_f = W.shape[1]
    maxq = 2 ** bits - 1
    loss = torch.zeros((), device=W.device)
    scale, zero = made[0] if gs == -1 else (None, None)
    if static is not None:
        static_scales = torch.stack([s for s, _ in static])        # [G, out]
        static_zeros = torch.stack([z for _, z in static])
        col_group = orig // gs
    B = block_width(gs)
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        if static is not None:
            scale, zero = static_scales[col_group[i1:i2]].t(), static_zeros[col_group[i1:i2]].t()
        elif gs != -1 and i1 % gs == 0:
            scale, zero = grid_params(W[:, i1:i1 + gs], bits, sym, scale_dtype)
            made.append((scale, zero))
        C1, Err1 = quantize_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale, zero, maxq)
        codes[:, i1:i2] = C1.t()
        loss += Err1.pow(2).sum() / 2
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)
    return loss


def _block_torch(W1, Hinv1, scale, zero, maxq):
    """One block's column loop in torch, with gptq_triton.quantize_block's contract (scale/zero per
    row [rows] or per row and column [rows, ncols]; returns codes uint8 and errors, both [ncols, rows]).
    The block is held transposed so a column is a contiguous row. The update is a product then a
    subtraction, two roundings, as in the kernel: torch's addr_ contracts them into an FMA on
    AVX2/AVX-512 builds and not on others, which would make the result depend on the CPU."""
    Wt = W1.t().contiguous()
    C = torch.empty_like(Wt)
    Err = torch.empty_like(Wt)
    prod = torch.empty_like(Wt)
    per_col = scale.dim() == 2
    for i in range(Wt.shape[0]):
        s, z = (scale[:, i], zero[:, i]) if per_col else (scale, zero)
        w = Wt[i]
        q = quantize_codes(w, s, z, maxq)
        C[i] = q
        torch.div(w - s * (q - z), Hinv1[i, i], out=Err[i])
        Wt[i + 1:].sub_(torch.mul(Hinv1[i, i + 1:, None], Err[i], out=prod[i + 1:]))
    return C.to(torch.uint8), Err


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T) with E = Q - W: the output error on the calibration inputs."""
    E = Q - W
    return (torch.sum((E @ H) * E) / torch.sum((W @ H) * W).clamp(min=1e-30)).item()


class HessianAccumulator:
    """Running H = 2/N * sum x x^T over the rows of a Linear's inputs, in float32.

    X^T X is symmetric, so only its upper block triangle is computed (in HESSIAN_BLOCKS column
    blocks: 10/16 of the products for 4 blocks) and mirrored once at the end; the values are the
    same as the full product's."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0
        self.block = in_features if in_features < 256 else -(-in_features // HESSIAN_BLOCKS)

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1])
        d, b = x.shape[1], self.block
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # Tensor cores multiply 16-bit values exactly and accumulate in float32: the same H
            # as the float32 product up to summation order, at several times the speed.
            for i in range(0, d, b):
                self.H[i:i + b, i:] += torch.mm(x[:, i:i + b].t(), x[:, i:], out_dtype=torch.float32)
        else:
            x = x.float()
            for i in range(0, d, b):
                self.H[i:i + b, i:].addmm_(x[:, i:i + b].t(), x[:, i:])
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        upper = torch.triu(self.H)
        return (upper + torch.triu(self.H, 1).t()) * (2.0 / max(self.n, 1))
