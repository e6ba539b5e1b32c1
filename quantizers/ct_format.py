"""compressed-tensors `pack-quantized` (FORMATS.md §3), what llm-compressor writes and vLLM runs
natively: codes packed along in (signed values stored with a +2^(b-1) offset, i.e. our unsigned
codes), scales [out, G] in the model dtype, zero points packed along out when asymmetric."""
import torch

from service.errors import ArtifactError, SpecError

from .grid import QuantizedWeight, group_index
from .packing import pack_cols, pack_rows, unpack_cols, unpack_rows

TENSORS = ("weight_packed", "weight_scale", "weight_shape")


def tensor_names(sym: bool) -> tuple[str, ...]:
    """The tensors one Linear has: zero points only when asymmetric."""
    return TENSORS if sym else TENSORS + ("weight_zero_point",)


def check_writable(bits: int, group_size: int, in_features: int, monotonic: bool = True):
    if bits not in (2, 4, 8):
        raise SpecError(f"compressed-tensors pack-quantized is written for 2, 4 or 8 bits here, not {bits}")
    if group_size != -1 and in_features % group_size:
        raise SpecError(f"compressed-tensors needs in_features % group_size == 0 (no ragged last group); got "
                        f"in={in_features}, group_size={group_size}; choose a group size dividing {in_features}")
    if not monotonic:
        raise SpecError("writing dynamic act-order (weight_g_idx) to compressed-tensors is not implemented; "
                        "use --act-order static, which compressed-tensors stores without a g_idx")


def to_tensors(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out_f, in_f = qw.codes.shape
    check_writable(qw.bits, qw.group_size, in_f, torch.equal(qw.g_idx.cpu(), group_index(in_f, qw.group_size)))
    t = {
        "weight_packed": pack_cols(qw.codes.to(torch.int64), qw.bits),
        "weight_scale": qw.scales.t().to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not qw.sym:
        t["weight_zero_point"] = pack_rows(qw.zeros.t().to(torch.int64), qw.bits, pad=True).contiguous()
    return t


def from_tensors(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    missing = [k for k in tensor_names(sym) if k not in t]
    if missing:
        raise ArtifactError(f"compressed-tensors module is missing tensors {missing}")
    out_f, in_f = (int(x) for x in t["weight_shape"])
    codes = unpack_cols(t["weight_packed"], bits, in_f).to(torch.uint8)
    scales = t["weight_scale"].float().t().contiguous()
    G = scales.shape[0]
    if sym:
        zeros = torch.full((G, out_f), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_rows(t["weight_zero_point"], bits, out_f).t().contiguous()
    return QuantizedWeight(codes, scales, zeros, group_index(in_f, group_size), bits, group_size, sym)


def quantization_config(bits: int, group_size: int, sym: bool, actorder: str | None, meta: dict) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size,
               "actorder": actorder, "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "meta": meta}
