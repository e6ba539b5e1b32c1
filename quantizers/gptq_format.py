"""The GPTQ checkpoint layout (FORMATS.md §1): qweight packed along in, qzeros along out,
float16 scales [G, out], g_idx [in]. v1 ("gptq") stores zero - 1 and is only exact for sym;
"gptq_v2" stores the true zero and is what we write for asym."""
import torch

from service.errors import ArtifactError, SpecError

from .grid import QuantizedWeight
from .packing import pack_cols, pack_rows, unpack_cols, unpack_rows

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_format(sym: bool) -> str:
    return "gptq" if sym else "gptq_v2"


def check_writable(bits: int, in_features: int, out_features: int):
    """Shapes the packed layout can hold; the caller turns a failure into a preflight refusal."""
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise SpecError(f"GPTQ {bits}-bit packing needs in and out features whose bit count is a multiple of 32; "
                        f"got in={in_features}, out={out_features}")


def to_tensors(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    out_f, in_f = qw.codes.shape
    check_writable(qw.bits, in_f, out_f)
    zeros = qw.zeros.to(torch.int64)
    if fmt == "gptq":
        if not qw.sym:
            raise SpecError("GPTQ v1 stores zero - 1 and cannot hold asymmetric zeros; write gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack_rows(qw.codes.t(), qw.bits),
        "qzeros": pack_cols(zeros, qw.bits),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).clone(),
    }


def from_tensors(t: dict[str, torch.Tensor], bits: int, fmt: str, sym: bool, group_size: int) -> QuantizedWeight:
    missing = [k for k in TENSORS if k not in t]
    if missing:
        raise ArtifactError(f"GPTQ module is missing tensors {missing}")
    in_f = t["g_idx"].shape[0]
    out_f = t["scales"].shape[1]
    codes = unpack_rows(t["qweight"], bits, in_f).t().to(torch.uint8)
    zeros = unpack_cols(t["qzeros"], bits, out_f)
    if fmt == "gptq":
        zeros = zeros + 1     # readers add 1 without masking, as the v1 loaders do
    return QuantizedWeight(codes.contiguous(), t["scales"].float(), zeros.to(torch.int32), t["g_idx"].to(torch.int32),
                           bits, group_size, sym)


def act_order(desc_act: bool, static_groups: bool) -> str:
    """none | static (columns in Hessian order, groups in natural order: g_idx = c // group_size) |
    dynamic (groups formed in Hessian order: non-monotonic g_idx)."""
    return "none" if not desc_act else ("static" if static_groups else "dynamic")


def quantization_config(bits, group_size, sym, desc_act, static_groups, true_sequential, damp_percent, meta) -> dict:
    """`desc_act` tells a loader whether g_idx may be non-monotonic (it must then gather scales per input
    channel; vLLM refuses such checkpoints): only dynamic act-order with groups makes it so. Static
    act-order leaves an ordinary desc_act=false checkpoint, so what was done is kept in `meta.act_order`."""
    order = act_order(desc_act, static_groups)
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": order == "dynamic" and group_size != -1,
        "sym": sym,
        "checkpoint_format": checkpoint_format(sym),
        "true_sequential": true_sequential,
        "static_groups": static_groups,
        "damp_percent": damp_percent,
        "lm_head": False,
        "meta": {**meta, "act_order": order},
    }
