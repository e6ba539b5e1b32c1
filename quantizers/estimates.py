"""What a job will need, known before it runs: device memory for the layer walk and the artifact's
size. Admission and the pipeline check these against the worker and the disk before any work."""
import torch

from .layers import decoder_layers
from .scheme import Scheme


def device_memory_gb(hidden: int, intermediate: int, tokens: int) -> float:
    """Device memory of the layer walk: one decoder layer in float32 with GPTQ's working copies, the
    calibration activations (in, out and replayed outputs, 16-bit) and the widest Hessian. The model
    itself stays in host memory (the walk moves one layer at a time)."""
    h, inter = hidden, intermediate
    layer = 4 * h * h + 3 * h * inter
    need = layer * 4 * 3 + tokens * h * 2 * 4 + tokens * inter * 2 + 2 * inter * inter * 4
    return round(need / 2 ** 30 + 1.0, 2)


def artifact_bytes(model, q: Scheme) -> int:
    """Bytes the artifact's weights will take: the decoder Linears at `bits` plus a 16-bit scale and
    a zero per group and row, everything else at 16 bits."""
    quantized = [m for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
    q_params = sum(m.weight.numel() for m in quantized)
    groups = sum(m.out_features * (1 if q.group_size == -1 else -(-m.in_features // q.group_size))
                 for m in quantized)
    others = sum(p.numel() for p in model.parameters()) - q_params
    return q_params * q.bits // 8 + groups * 3 + others * 2
