"""The AWQ GEMM checkpoint layout (FORMATS.md §2): 4-bit only, qweight [in, out/8] and qzeros
[G, out/8] packed along out with AutoAWQ's interleave, true zeros, float16 scales [G, out]."""
import torch

from service.errors import ArtifactError, SpecError

from .grid import QuantizedWeight, group_index
from .packing import pack_cols, unpack_cols

TENSORS = ("qweight", "qzeros", "scales")
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])        # word nibble i holds column 8c + ORDER[i]
UNDO = torch.argsort(ORDER)                             # [0, 4, 1, 5, 2, 6, 3, 7]


def check_writable(bits: int, group_size: int, in_features: int, out_features: int, monotonic: bool = True):
    if bits != 4:
        raise SpecError(f"the AWQ format holds 4-bit weights only, not {bits}-bit; use --format gptq or compressed-tensors")
    if group_size == -1:
        raise SpecError("the AWQ format needs a positive group size (its kernels have no per-row mode)")
    if in_features % group_size or out_features % 8:
        raise SpecError(f"the AWQ format needs in_features % group_size == 0 and out_features % 8 == 0; got "
                        f"in={in_features}, out={out_features}, group_size={group_size}")
    if not monotonic:
        raise SpecError("the AWQ format has no g_idx, so it cannot hold dynamic act-order; use --act-order static")


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """[r, n] -> [r, n] with each run of 8 columns in nibble order."""
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[..., ORDER].reshape(r, n)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[..., UNDO].reshape(r, n)


def to_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out_f, in_f = qw.codes.shape
    natural = group_index(in_f, qw.group_size)
    check_writable(qw.bits, qw.group_size, in_f, out_f, torch.equal(qw.g_idx.cpu(), natural))
    return {
        "qweight": pack_cols(_interleave(qw.codes.t().to(torch.int64)), 4),
        "qzeros": pack_cols(_interleave(qw.zeros.to(torch.int64)), 4),
        "scales": qw.scales.to(torch.float16).contiguous(),
    }


def from_tensors(t: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    missing = [k for k in TENSORS if k not in t]
    if missing:
        raise ArtifactError(f"AWQ module is missing tensors {missing}")
    in_f = t["qweight"].shape[0]
    out_f = t["scales"].shape[1]
    codes = _deinterleave(unpack_cols(t["qweight"], 4, out_f)).t().to(torch.uint8).contiguous()
    zeros = _deinterleave(unpack_cols(t["qzeros"], 4, out_f)).to(torch.int32).contiguous()
    return QuantizedWeight(codes, t["scales"].float(), zeros, group_index(in_f, group_size), 4, group_size, sym=False)


def quantization_config(group_size: int, meta: dict) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None, "meta": meta}


def side_file(group_size: int) -> dict:
    """quant_config.json, read by older AutoAWQ-era loaders."""
    return {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}
