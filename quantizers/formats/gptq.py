"""GPTQ (FORMATS.md §1): qweight packed along in, qzeros along out, float16 scales [G, out], g_idx [in].
v1 ("gptq") stores zero - 1 and is only exact for sym; "gptq_v2" stores the true zero and is what we
write for asym. Read by gptqmodel (transformers) and vLLM."""
import re

import torch

from core.errors import ArtifactError, SpecError

from ..grid import QuantizedWeight
from ..packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from ..scheme import ActOrder, Scheme
from . import vllm
from .base import Format, Usage, Verdict

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def layout(sym: bool) -> str:
    """checkpoint_format: v1 for symmetric grids, v2 (true zeros) for asymmetric ones."""
    return "gptq" if sym else "gptq_v2"


class GPTQ(Format):
    name = quant_method = "gptq"
    marker = "qweight"
    title = "GPTQ"

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        if (in_features * q.bits) % 32 or (out_features * q.bits) % 32:
            raise SpecError(f"GPTQ {q.bits}-bit packing needs in and out features whose bit count is a multiple of "
                            f"32; got in={in_features}, out={out_features}")

    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        return self.pack(qw, layout(qw.sym))

    def pack(self, qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
        out_f, in_f = qw.codes.shape
        self.check(Scheme(qw.bits, qw.group_size, qw.sym), in_f, out_f)
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

    def unpack(self, t: dict[str, torch.Tensor], bits: int, fmt: str, sym: bool, group_size: int) -> QuantizedWeight:
        missing = [k for k in TENSORS if k not in t]
        if missing:
            raise ArtifactError(f"GPTQ module is missing tensors {missing}")
        in_f = t["g_idx"].shape[0]
        out_f = t["scales"].shape[1]
        codes = unpack_rows(t["qweight"], bits, in_f).t().to(torch.uint8)
        zeros = unpack_cols(t["qzeros"], bits, out_f)
        if fmt == "gptq":
            zeros = zeros + 1     # readers add 1 without masking, as the v1 loaders do
        return QuantizedWeight(codes.contiguous(), t["scales"].float(), zeros.to(torch.int32),
                               t["g_idx"].to(torch.int32), bits, group_size, sym)

    def config(self, q: Scheme, algorithm: dict, meta: dict) -> tuple[dict, dict[str, dict]]:
        """`desc_act` tells a loader whether g_idx may be non-monotonic (it must then gather scales per input
        channel; vLLM refuses such checkpoints): only dynamic act-order with groups makes it so. Static
        act-order leaves an ordinary desc_act=false checkpoint, so what was done is kept in `meta.act_order`."""
        qc = {
            "quant_method": "gptq",
            "bits": q.bits,
            "group_size": q.group_size,
            "desc_act": not q.monotonic,
            "sym": q.sym,
            "checkpoint_format": layout(q.sym),
            "true_sequential": algorithm.get("true_sequential", True),
            "static_groups": q.static_groups,
            "damp_percent": algorithm.get("damp_percent", 0.01),
            "lm_head": False,
            "meta": {**meta, "act_order": q.act_order.value},
        }
        return qc, {"quantize_config.json": qc}        # the same dict: declare_kept reaches both

    def declare_kept(self, qc: dict, names: list[str]) -> None:
        if names:                                      # gptqmodel's `dynamic` rules: "-:" + a regex = skip
            qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in names}

    def scheme_of(self, qc: dict) -> tuple[Scheme, str]:
        # quantfarm records the act-order in meta: static act-order is written as desc_act: false (g_idx is
        # monotonic); other GPTQ writers only have desc_act and static_groups to go by
        meta = qc.get("meta", {})
        act = meta.get("act_order") or ActOrder.of(qc.get("desc_act", False), qc.get("static_groups", False))
        return Scheme(qc["bits"], qc["group_size"], qc.get("sym", True), act), meta.get("algorithm", "gptq")

    def reader(self, qc: dict):
        fmt, sym = qc.get("checkpoint_format", "gptq"), qc.get("sym", True)
        return TENSORS, lambda t: self.unpack(t, qc["bits"], fmt, sym, qc["group_size"])

    def unpacked_shape(self, shape, q):
        return shape[0] * 32 // q.bits, shape[1]

    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        config = vllm.gptq_config_refusal(q)
        why_ragged = vllm.ragged(q, shapes)
        ragged = ("AssertionError", why_ragged) if why_ragged else None
        gpu = vllm.gpu("auto_gptq", q, moe, ((4, True), (8, True)),
                       config or vllm.marlin_group_refusal(q) or ragged)
        cpu_marlin = ("Marlin does not support weight_bits = uint8b128", "vLLM CPU runs GPTQ 4-bit only") \
            if q.bits != 4 else None     # it checks the Marlin types of the CPU, which are 4-bit only
        cpu = vllm.cpu("auto_gptq", config or cpu_marlin or vllm.marlin_group_refusal(q)
                       or vllm.cpu_kernel_refusal(q, shapes) or ragged, moe)
        if moe:
            tf = vllm.transformers_moe_refusal("gptq")
        elif q.ragged_widths(shapes):
            tf = Verdict("transformers", True, "gptqmodel with GPTQConfig(backend='torch')",
                         ["a ragged last group loads only with quantization_config=GPTQConfig(bits=..., "
                          "backend='torch') (gptqmodel's default CPU kernel fails on it)"])
        else:
            tf = Verdict("transformers", True, "gptqmodel")
        return [gpu, cpu, tf]

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        if ragged:
            return Usage("optimum and gptqmodel", f", quantization_config=GPTQConfig(bits={q.bits}, backend=\"torch\")",
                         ", GPTQConfig")
        return Usage("optimum and gptqmodel")
