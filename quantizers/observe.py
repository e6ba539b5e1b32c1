"""Static input scales (FP8 with activation scales from calibration): what each quantized Linear of a decoder
layer sees over the calibration samples, once the layer's weights are quantized, over E4M3's largest value.
The walk calls it after the algorithm's step, on the inputs that step received.

The observed value is the mean over samples of each sample's largest |x| (a rarer, larger value is clipped to
448 x scale): on SmolLM2-135M it gave perplexity 25.773 where the largest |x| over all samples gave 25.896
and llm-compressor's moving average 25.843 (fp16 25.228; BENCHMARKS.md, 2026-12-07 evening)."""
import torch

from .grid import FP8_MAX, SCALE_MIN
from .layers import is_kept, layer_linears, run_layer
from .scheme import Scheme


@torch.no_grad()
def input_scales(layer, hidden, kwargs, q: Scheme) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """({Linear name in the layer: input scale [1], float32, exact in the scale dtype}, the layer's outputs)."""
    linears = {n: m for n, m in layer_linears(layer).items() if not is_kept(m)}
    peaks = {n: [] for n in linears}          # per sample ([batch, seq, in]); routed experts: per batch ([tokens, in])

    def seen(n):
        def hook(_mod, args):
            x = args[0].abs()
            peaks[n].append(x.reshape(x.shape[0], -1).amax(1).float() if x.dim() > 2 else x.amax().float().reshape(1))
        return hook

    hooks = [m.register_forward_pre_hook(seen(n)) for n, m in linears.items()]
    try:
        outputs = [run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
    finally:
        for h in hooks:
            h.remove()
    top = {n: torch.cat(p).mean() if p else torch.zeros(()) for n, p in peaks.items()}   # an expert nothing reached
    return ({n: (t / FP8_MAX).to(q.scale_torch_dtype).float().clamp(min=SCALE_MIN).reshape(1) for n, t in top.items()},
            outputs)
