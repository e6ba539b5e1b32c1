"""The inputs of a quantized Linear as the runtime quantizes them at each call (W8A8, FP8_DYNAMIC): our reader
applies the same rounding, so a recovery figure is the scheme as served, not its weights alone.

Dynamic per-token scales as vLLM computes them: int8 absmax / 127 rounded and clamped to [-128, 127] (its
scaled_int8_quant), FP8 absmax / 448 cast to E4M3 (its scaled_fp8_quant)."""
import torch

from .grid import FP8_MAX, float_codes
from .schemes import Quant

INT8_DIVISOR = 127.0    # vLLM's; compressed-tensors' own forward (transformers) divides by 127.5


def problem(a: Quant | None) -> str | None:
    """Why activations of this kind are not run here (None: they are)."""
    if a is None or not a.symmetric or a.bits != 8:
        return None if a is None else f"{a.type} {a.bits}-bit activations are not implemented yet"
    if (a.strategy == "token" and a.dynamic is True) or (a.type, a.strategy, a.dynamic) == ("float", "tensor", False):
        return None
    return (f"{a.type} {a.bits}-bit activations with {a.strategy} scales ({'dynamic' if a.dynamic else 'static'}) are "
            "not implemented yet; dynamic per-token 8-bit (W8A8, FP8_DYNAMIC) and static per-tensor FP8 (FP8) are")


def fake_quantize(x: torch.Tensor, a: Quant, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded as the runtime rounds it, back in x's dtype (the arithmetic in float32); `scale`: the static
    input scale calibration fixed (FP8 per tensor)."""
    why = problem(a)
    if why:
        raise NotImplementedError(why)
    xf = x.float()
    top = INT8_DIVISOR if a.type == "int" else FP8_MAX
    if a.dynamic is False:
        s = scale.float()
    else:
        s = (xf.abs().amax(-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(xf / s).clamp(-128, 127) if a.type == "int" else float_codes(xf, s).float()
    return (q * s).to(x.dtype)
