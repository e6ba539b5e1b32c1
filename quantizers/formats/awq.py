"""AWQ GEMM (FORMATS.md §2): 4-bit only, qweight [in, out/8] and qzeros [G, out/8] packed along out
with AutoAWQ's interleave, true zeros, float16 scales [G, out]. Read by gptqmodel and vLLM."""
import torch

from core.errors import ArtifactError, SpecError

from ..grid import QuantizedWeight, group_index
from ..packing import pack_cols, unpack_cols
from ..scheme import Scheme
from . import vllm
from .base import Format, Usage, Verdict

TENSORS = ("qweight", "qzeros", "scales")
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])        # word nibble i holds column 8c + ORDER[i]
UNDO = torch.argsort(ORDER)                             # [0, 4, 1, 5, 2, 6, 3, 7]


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """[r, n] -> [r, n] with each run of 8 columns in nibble order."""
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[..., ORDER].reshape(r, n)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[..., UNDO].reshape(r, n)


class AWQ(Format):
    name = quant_method = "awq"
    marker = "qweight"
    title = "AWQ"

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        if q.bits != 4:
            raise SpecError(f"the AWQ format holds 4-bit weights only, not {q.bits}-bit; use --format gptq or "
                            "compressed-tensors")
        if q.group_size == -1:
            raise SpecError("the AWQ format needs a positive group size (its kernels have no per-row mode)")
        if in_features % q.group_size or out_features % 8:
            raise SpecError(f"the AWQ format needs in_features % group_size == 0 and out_features % 8 == 0; got "
                            f"in={in_features}, out={out_features}, group_size={q.group_size}")
        if not q.monotonic:
            raise SpecError("the AWQ format has no g_idx, so it cannot hold dynamic act-order; use --act-order static")

    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        out_f, in_f = qw.codes.shape
        natural = torch.equal(qw.g_idx.cpu(), group_index(in_f, qw.group_size))
        self.check(Scheme(qw.bits, qw.group_size, qw.sym, "none" if natural else "dynamic"), in_f, out_f)
        return {
            "qweight": pack_cols(_interleave(qw.codes.t().to(torch.int64)), 4),
            "qzeros": pack_cols(_interleave(qw.zeros.to(torch.int64)), 4),
            "scales": qw.scales.to(torch.float16).contiguous(),
        }

    def unpack(self, t: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
        missing = [k for k in TENSORS if k not in t]
        if missing:
            raise ArtifactError(f"AWQ module is missing tensors {missing}")
        in_f = t["qweight"].shape[0]
        out_f = t["scales"].shape[1]
        codes = _deinterleave(unpack_cols(t["qweight"], 4, out_f)).t().to(torch.uint8).contiguous()
        zeros = _deinterleave(unpack_cols(t["qzeros"], 4, out_f)).to(torch.int32).contiguous()
        return QuantizedWeight(codes, t["scales"].float(), zeros, group_index(in_f, group_size), 4, group_size,
                               sym=False)

    def config(self, q: Scheme, algorithm: dict, meta: dict) -> tuple[dict, dict[str, dict]]:
        qc = {"quant_method": "awq", "bits": 4, "group_size": q.group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None, "meta": meta}
        # quant_config.json, read by older AutoAWQ-era loaders
        side = {"zero_point": True, "q_group_size": q.group_size, "w_bit": 4, "version": "GEMM"}
        return qc, {"quant_config.json": side}

    def declare_kept(self, qc: dict, names: list[str]) -> None:
        if names:
            qc["modules_to_not_convert"] = names

    def scheme_of(self, qc: dict) -> tuple[Scheme, str]:
        return Scheme(qc.get("bits", 4), qc["group_size"], False), qc.get("meta", {}).get("algorithm", "awq")

    def reader(self, qc: dict):
        if qc.get("bits") != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
            raise ArtifactError(f"only 4-bit AWQ GEMM checkpoints are read, not {qc}")
        return TENSORS, lambda t: self.unpack(t, qc["group_size"])

    def unpacked_shape(self, shape, q):
        return shape[0], shape[1] * 8

    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        # AWQ always finds a GPU kernel: Marlin at its group sizes, else its own Triton GEMM
        gpu = vllm.gpu("auto_awq", q, moe, ((4, True), (4, False)), fallback=(
            "Triton AWQ GEMM", f"vLLM (GPU): group size {q.group_size} has no Marlin kernel; it falls back to "
                               "AutoAWQLinearMethod (Triton AWQ GEMM)"))
        cpu = vllm.cpu("awq", vllm.cpu_kernel_refusal(q, shapes), moe)
        if moe:
            tf = vllm.transformers_moe_refusal("awq")
        else:
            tf = Verdict("transformers", True, "gptqmodel (AWQ GEMM)",
                         [] if q.group_size in (32, 64, 128, 256) else
                         [f"gptqmodel's CPU AWQ kernel takes group sizes 32, 64, 128 or 256, not {q.group_size}"])
        return [gpu, cpu, tf]

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        return Usage("gptqmodel")
