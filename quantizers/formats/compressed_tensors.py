"""compressed-tensors `pack-quantized` (FORMATS.md §3), what llm-compressor writes and vLLM runs
natively: codes packed along in (signed values stored with a +2^(b-1) offset, i.e. our unsigned
codes), scales [out, G] in the model dtype, zero points packed along out when asymmetric."""
import torch

from core.errors import ArtifactError, SpecError

from ..grid import QuantizedWeight, group_index
from ..packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from ..scheme import ActOrder, Scheme
from . import vllm
from .base import Format, Usage, Verdict

TENSORS = ("weight_packed", "weight_scale", "weight_shape")


def tensor_names(sym: bool) -> tuple[str, ...]:
    """The tensors one Linear has: zero points only when asymmetric."""
    return TENSORS if sym else TENSORS + ("weight_zero_point",)


class CompressedTensors(Format):
    name = quant_method = "compressed-tensors"
    marker = "weight_packed"
    title = "compressed-tensors"

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        if q.bits not in (2, 4, 8):
            raise SpecError(f"compressed-tensors pack-quantized is written for 2, 4 or 8 bits here, not {q.bits}")
        if q.group_size != -1 and in_features % q.group_size:
            raise SpecError(f"compressed-tensors needs in_features % group_size == 0 (no ragged last group); got "
                            f"in={in_features}, group_size={q.group_size}; choose a group size dividing {in_features}")
        if not q.monotonic:
            raise SpecError("writing dynamic act-order (weight_g_idx) to compressed-tensors is not implemented; "
                            "use --act-order static, which compressed-tensors stores without a g_idx")

    def scale_dtype(self, storage: torch.dtype) -> torch.dtype:
        return storage                     # scales in the model's own 16-bit dtype

    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        out_f, in_f = qw.codes.shape
        natural = torch.equal(qw.g_idx.cpu(), group_index(in_f, qw.group_size))
        self.check(Scheme(qw.bits, qw.group_size, qw.sym, "none" if natural else "dynamic"), in_f, out_f)
        t = {
            "weight_packed": pack_cols(qw.codes.to(torch.int64), qw.bits),
            "weight_scale": qw.scales.t().to(storage).contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not qw.sym:
            t["weight_zero_point"] = pack_rows(qw.zeros.t().to(torch.int64), qw.bits, pad=True).contiguous()
        return t

    def unpack(self, t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
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

    def config(self, q: Scheme, algorithm: dict, meta: dict) -> tuple[dict, dict[str, dict]]:
        weights = {"num_bits": q.bits, "type": "int", "symmetric": q.sym,
                   "strategy": "channel" if q.group_size == -1 else "group",
                   "group_size": None if q.group_size == -1 else q.group_size,
                   "actorder": "static" if q.act_order == ActOrder.STATIC else None, "dynamic": False,
                   "observer": "minmax"}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                            "output_activations": None, "format": "pack-quantized"}},
              "ignore": ["lm_head"], "kv_cache_scheme": None, "meta": meta}
        return qc, {}

    def declare_kept(self, qc: dict, names: list[str]) -> None:
        qc["ignore"] = [*qc.get("ignore", []), *names]

    def _weights(self, qc: dict) -> dict:
        groups = list(qc.get("config_groups", {}).values())
        if qc.get("format") != "pack-quantized" or len(groups) != 1:
            raise ArtifactError("only pack-quantized compressed-tensors checkpoints with one config group are read")
        return groups[0]["weights"]

    def scheme_of(self, qc: dict) -> tuple[Scheme, str]:
        w = next(iter(qc["config_groups"].values()))["weights"]
        gs = -1 if w.get("strategy") == "channel" else w["group_size"]
        act = ActOrder.STATIC if w.get("actorder") else ActOrder.NONE
        return Scheme(w["num_bits"], gs, w["symmetric"], act), qc.get("meta", {}).get("algorithm", "unknown")

    def reader(self, qc: dict):
        w = self._weights(qc)
        gs = -1 if w.get("strategy") == "channel" else w["group_size"]
        return tensor_names(w["symmetric"]), lambda t: self.unpack(t, w["num_bits"], gs, w["symmetric"])

    def unpacked_shape(self, shape, q):
        return shape[1] * 32 // q.bits, shape[0]

    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        # always a GPU kernel: Marlin where it takes the grid (asym 4-bit too), else Humming as a last resort
        gpu = vllm.gpu("compressed-tensors", q, moe, ((4, True), (8, True), (4, False)))
        cpu = vllm.cpu("compressed-tensors", vllm.cpu_kernel_refusal(q, shapes) or vllm.cpu_moe_refusal(moe, not q.sym),
                       moe)
        if not q.sym:
            tf = Verdict("transformers", True, "compressed-tensors with CompressedTensorsConfig(run_compressed=False)",
                         ["asymmetric weights load only decompressed: from_pretrained(..., quantization_config="
                          "CompressedTensorsConfig(run_compressed=False)); its compressed path expects unpacked zero "
                          "points and refuses the packed ones compressed-tensors itself writes"])
        else:
            tf = Verdict("transformers", True, "compressed-tensors")
        return [gpu, cpu, tf]

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        if not q.sym:
            return Usage("compressed-tensors", ", quantization_config=CompressedTensorsConfig(run_compressed=False)",
                         ", CompressedTensorsConfig")
        return Usage("compressed-tensors")
