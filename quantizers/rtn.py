"""Round-to-nearest: the baseline every calibrated algorithm must beat, on the same grid."""
import torch

from .grid import FP8, QuantizedWeight, float_codes, float_params, grid_params, group_count, group_index, quantize_codes
from .scheme import Scheme


def quantize_weight(W: torch.Tensor, q: Scheme = Scheme()) -> QuantizedWeight:
    """Quantize W [out, in] group by group onto `q` (integer codes, or E4M3 values for float weights), no data
    needed."""
    bits, group_size, sym, scale_dtype = q.bits, q.group_size, q.sym, q.scale_torch_dtype
    W = W.float()
    out_f, in_f = W.shape
    maxq = 2 ** bits - 1
    gs = in_f if group_size == -1 else group_size
    G = group_count(in_f, group_size)
    scales = torch.empty(G, out_f, device=W.device)
    zeros = torch.empty(G, out_f, device=W.device)
    floats = q.weight_type == "float"
    codes = torch.empty(out_f, in_f, dtype=FP8 if floats else torch.uint8, device=W.device)
    for g in range(G):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        if floats:
            s = float_params(W[:, cols].reshape(1, -1) if q.per_tensor else W[:, cols], scale_dtype).expand(out_f)
            z = torch.zeros(out_f, device=W.device)
            codes[:, cols] = float_codes(W[:, cols], s[:, None])
        else:
            s, z = grid_params(W[:, cols], bits, sym, scale_dtype)
            codes[:, cols] = quantize_codes(W[:, cols], s[:, None], z[:, None], maxq).to(torch.uint8)
        scales[g], zeros[g] = s, z
    return QuantizedWeight(codes, scales, zeros.to(torch.int32), group_index(in_f, group_size, W.device),
                           bits, group_size, sym)
