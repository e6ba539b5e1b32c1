"""The integer grid every algorithm quantizes onto, and the result type they all return.

Conventions are those of ../shared/FORMATS.md §1 (the GPTQ reference quantizer): maxq = 2**bits - 1,
scale = (xmax - xmin) / maxq with xmin <= 0 <= xmax; sym puts the zero at (maxq + 1) / 2;
asym rounds it to round(-xmin / scale). Scales are rounded to the checkpoint's scale dtype
(float16; compressed-tensors: the model's) *before* the codes are chosen, so the artifact holds
exactly the weights the algorithm propagated through later layers.
"""
import dataclasses
from dataclasses import dataclass

import torch

SCALE_MIN = 2.0 ** -24  # smallest float16 subnormal: a scale never rounds to zero
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0         # largest finite E4M3 value


@dataclass
class QuantizedWeight:
    """One Linear's quantized weight, layout-neutral.

    codes [out, in] uint8 in [0, maxq] (float weights: float8_e4m3fn values, zeros 0); scales [G, out] float32
    (exact in the scale dtype); zeros [G, out] int32; g_idx [in] int32 maps each input channel to its group
    (rows of scales/zeros).
    Dequantized: W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]). input_scale: the static
    scale its inputs are rounded with when it runs (FP8 static activations; from calibration), else None.
    """
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    input_scale: torch.Tensor | None = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        s = self.scales[g].t()                 # [out, in]
        z = self.zeros[g].t().to(s.dtype)
        return (s * (self.codes.to(s.dtype) - z)).to(dtype)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The slice of output channels [start, stop): splits a concatenated q/k/v result."""
        return dataclasses.replace(self, codes=self.codes[start:stop], scales=self.scales[:, start:stop],
                                   zeros=self.zeros[:, start:stop])

    def cpu(self) -> "QuantizedWeight":
        return dataclasses.replace(self, **{f.name: v.cpu() for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})


def grid_params(W: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16):
    """Scale and zero per row of W [rows, cols] (one group). Returns float32 [rows], float32 [rows];
    the scale is exact in `scale_dtype`, the dtype the checkpoint stores it in."""
    maxq = 2 ** bits - 1
    xmin = W.min(1).values.clamp(max=0)
    xmax = W.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(scale_dtype).float().clamp(min=SCALE_MIN)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def float_params(W: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """FP8 scale per row of W [rows, cols]: absmax / 448, so the row's largest weight is E4M3's largest value
    (exact in `scale_dtype`). Float32 [rows]."""
    return (W.abs().amax(1) / FP8_MAX).to(scale_dtype).float().clamp(min=SCALE_MIN)


def float_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 values of w / scale (round to nearest even, saturated at +-448)."""
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w on the grid (scale, zero), broadcast along w's trailing dims."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx for groups in natural column order (the last group may be ragged)."""
    idx = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size
