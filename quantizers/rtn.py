"""Round-to-nearest: the baseline every calibrated algorithm must beat, on the same grid."""
import torch

from .grid import QuantizedWeight, grid_params, group_count, group_index, quantize_codes
from .scheme import Scheme


def quantize_weight(W: torch.Tensor, q: Scheme = Scheme()) -> QuantizedWeight:
    """Quantize W [out, in] group by group onto `q`, no data needed."""
    bits, group_size, sym, scale_dtype = q.bits, q.group_size, q.sym, q.scale_torch_dtype
    W = W.float()
    out_f, in_f = W.shape
    maxq = 2 ** bits - 1
    gs = in_f if group_size == -1 else group_size
    G = group_count(in_f, group_size)
    scales = torch.empty(G, out_f, device=W.device)
    zeros = torch.empty(G, out_f, device=W.device)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    for g in range(G):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        s, z = grid_params(W[:, cols], bits, sym, scale_dtype)
        scales[g], zeros[g] = s, z
        codes[:, cols] = quantize_codes(W[:, cols], s[:, None], z[:, None], maxq).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros.to(torch.int32), group_index(in_f, group_size, W.device),
                           bits, group_size, sym)
