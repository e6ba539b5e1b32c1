"""The compressed-tensors layouts quantfarm writes, one class each, named as that library names them:
`pack-quantized` (integer codes packed into int32, FORMATS.md §3), `int-quantized` (int8 weights as they
are, W8A8) and `float-quantized` (FP8 E4M3 weights as they are, FP8_DYNAMIC). Each says which tensors a
Linear has, how our QuantizedWeight becomes them and back, and which vLLM path runs it (vLLM 0.32's rules,
checked against vLLM itself by tests/test_vllm.py)."""
import torch

from core.errors import ArtifactError, SpecError

from ..grid import FP8, QuantizedWeight, group_index
from ..packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from ..scheme import Scheme
from . import vllm
from .base import Verdict


class Layout:
    name: str
    marker: str               # the tensor only a quantized Linear has

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        if q.group_size != -1 and in_features % q.group_size:
            raise SpecError(f"compressed-tensors needs in_features % group_size == 0 (no ragged last group); got "
                            f"in={in_features}, group_size={q.group_size}; choose a group size dividing {in_features}")
        if not q.monotonic:
            raise SpecError("writing dynamic act-order (weight_g_idx) to compressed-tensors is not implemented; "
                            "use --act-order static, which compressed-tensors stores without a g_idx")

    def names(self, sym: bool) -> tuple[str, ...]:
        """The tensors one Linear must have."""
        raise NotImplementedError

    def optional(self) -> tuple[str, ...]:
        """The tensors one Linear may have besides (a static input scale)."""
        return ()

    def encode(self, qw: QuantizedWeight, storage: torch.dtype, per_tensor: bool = False) -> dict[str, torch.Tensor]:
        """One Linear's tensors; `per_tensor`: the config declares one weight scale per matrix."""
        raise NotImplementedError

    def decode(self, t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
        raise NotImplementedError

    def shape(self, key: str, entry: dict) -> tuple[str, tuple[int, int]] | None:
        """(module, (in, out)) when a safetensors header entry is this layout's quantized weight."""
        raise NotImplementedError

    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        raise NotImplementedError

    def _missing(self, t: dict, sym: bool):
        missing = [k for k in self.names(sym) if k not in t]
        if missing:
            raise ArtifactError(f"compressed-tensors {self.name} module is missing tensors {missing}")


class PackQuantized(Layout):
    """Codes packed along in (signed values stored with a +2^(b-1) offset, i.e. our unsigned codes), scales
    [out, G] in the model dtype, zero points packed along out when asymmetric."""
    name, marker = "pack-quantized", "weight_packed"

    def check(self, q, in_features, out_features):
        if q.bits not in (2, 4, 8):
            raise SpecError(f"compressed-tensors pack-quantized is written for 2, 4 or 8 bits here, not {q.bits}")
        super().check(q, in_features, out_features)

    def names(self, sym):
        base = ("weight_packed", "weight_scale", "weight_shape")
        return base if sym else base + ("weight_zero_point",)

    def encode(self, qw, storage, per_tensor=False):
        out_f, in_f = qw.codes.shape
        natural = torch.equal(qw.g_idx.cpu(), group_index(in_f, qw.group_size))
        self.check(Scheme(qw.bits, qw.group_size, qw.sym, "none" if natural else "dynamic"), in_f, out_f)
        t = {"weight_packed": pack_cols(qw.codes.to(torch.int64), qw.bits),
             "weight_scale": qw.scales.t().to(storage).contiguous(),
             "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
        if not qw.sym:
            t["weight_zero_point"] = pack_rows(qw.zeros.t().to(torch.int64), qw.bits, pad=True).contiguous()
        return t

    def decode(self, t, bits, group_size, sym):
        self._missing(t, sym)
        out_f, in_f = (int(x) for x in t["weight_shape"])
        codes = unpack_cols(t["weight_packed"], bits, in_f).to(torch.uint8)
        scales = t["weight_scale"].float().t().contiguous()
        G = scales.shape[0]
        if sym:
            zeros = torch.full((G, out_f), 2 ** (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_rows(t["weight_zero_point"], bits, out_f).t().contiguous()
        return QuantizedWeight(codes, scales, zeros, group_index(in_f, group_size), bits, group_size, sym)

    def shape(self, key, entry):
        return None     # packed: the format's own marker rule reads weight_packed's shape

    def runtimes(self, q, shapes, moe):
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


class _Unpacked(Layout):
    """One byte per weight, [out, in], beside weight_scale [out, G] in the model dtype (symmetric: no zero
    point): what compressed-tensors writes for 8-bit schemes that quantize activations too."""
    dtype: torch.dtype
    safetensors_dtype: str
    marker = "weight_scale"

    def check(self, q, in_features, out_features):
        if q.bits != 8 or not q.sym:
            raise SpecError(f"compressed-tensors {self.name} is written for symmetric 8-bit weights here")
        super().check(q, in_features, out_features)

    def names(self, sym):
        return ("weight", "weight_scale")

    def optional(self):
        return ("input_scale",)

    def encode(self, qw, storage, per_tensor=False):
        scale = qw.scales[:1, :1].reshape(1) if per_tensor else qw.scales.t()
        t = {"weight": self.stored(qw).contiguous(), "weight_scale": scale.to(storage).contiguous()}
        if qw.input_scale is not None:                   # static inputs: the scale calibration fixed, [1]
            t["input_scale"] = qw.input_scale.reshape(1).to(storage).contiguous()
        return t

    def decode(self, t, bits, group_size, sym):
        self._missing(t, sym)
        w = t["weight"]
        if w.dtype != self.dtype:
            raise ArtifactError(f"compressed-tensors {self.name} weight is {w.dtype}, not {self.dtype}")
        ws = t["weight_scale"].float()
        scales = ws.reshape(1, 1).expand(1, w.shape[0]).contiguous() if ws.numel() == 1 else ws.t().contiguous()
        codes, zero = self.codes(w)
        zeros = torch.full(scales.shape, zero, dtype=torch.int32)
        inputs = t["input_scale"].float().reshape(1) if "input_scale" in t else None
        return QuantizedWeight(codes, scales, zeros, group_index(w.shape[1], group_size), bits, group_size, sym,
                               inputs)

    def shape(self, key, entry):
        if key.endswith(".weight") and entry["dtype"] == self.safetensors_dtype and len(entry["shape"]) == 2:
            out_f, in_f = entry["shape"]
            return key[:-len(".weight")], (in_f, out_f)
        return None


# What vLLM 0.32 runs these with (tests/test_vllm.py asks vLLM's own kernel choice at sm75-sm100 and on this CPU)
INT8_GPU_KERNEL = "CutlassInt8ScaledMMLinearKernel"        # sm75 and newer
INT8_CPU_KERNEL = "CPUInt8ScaledMMLinearKernel"            # oneDNN int8 GEMM, any x86 CPU
FP8_GPU_WEIGHT_ONLY = "CompressedTensorsW8A16Fp8"          # below sm89: FP8 weights through Marlin, 16-bit inputs
FP8_GPU_KERNEL = "CutlassFP8ScaledMMLinearKernel"          # sm89 and newer (Ada, Hopper, Blackwell): W8A8 FP8
FP8_CPU_KERNEL = "ChannelWiseTorchFP8ScaledMMLinearKernel"  # torch's FP8 scaled-mm (AMX-FP8 CPUs have their own)
FP8_STATIC_CPU_REFUSAL = ("static_scaled_fp8_quant", "vLLM CPU's build has no static FP8 input quantization (its op "
                          "fails at the first forward) on CPUs without AMX")
FP8_STATIC_AMX_NOTE = ("on x86 CPUs with AMX vLLM CPU runs it as W8A16 (CPUFp8PerTensorScaledMMLinearKernel, 16-bit "
                       "inputs, the input scale unused); quantfarm's suite checks that it loads there, not its numerics")
INT8_MOE_REFUSAL = "No Int8 MoE backend supports the deployment configuration"
FP8_MOE_REFUSAL = "Unsupported FP8 MoE backend"


def cpu_moe_note(refusal: str) -> str:
    return (f"MoE experts: vLLM CPU runs them on x86 CPUs with AMX only (elsewhere it refuses: {refusal!r}); "
            "quantfarm's suite checks the refusal, not the AMX experts' numerics")


TF_MOE_NOTE = ("MoE experts: transformers fuses them into modules that are no Linears, so compressed-tensors rounds no "
               "input there: it runs the experts with 16-bit inputs")
MOE_NOTE = ("MoE experts: vLLM runs them with its fused-MoE method for this scheme, which quantfarm's suite does not "
            "check")


class IntQuantized(_Unpacked):
    """int8 = our code - 128 (the symmetric grid's zero), W = weight_scale * weight."""
    name, dtype, safetensors_dtype = "int-quantized", torch.int8, "I8"

    def stored(self, qw):
        return (qw.codes.to(torch.int16) - 128).to(torch.int8)

    def codes(self, w):
        return (w.to(torch.int16) + 128).to(torch.uint8), 128

    def runtimes(self, q, shapes, moe):
        acts = "int8 activations per token, quantized by vLLM at each call"
        return [Verdict("vllm", True, f"compressed-tensors W8A8 int8 with {INT8_GPU_KERNEL} on GPU (sm75 and newer)",
                        [acts] + [MOE_NOTE] * moe, kernel=INT8_GPU_KERNEL),
                Verdict("vllm-cpu", True, f"compressed-tensors W8A8 int8 with {INT8_CPU_KERNEL} on CPU",
                        [acts] + [cpu_moe_note(INT8_MOE_REFUSAL)] * moe, kernel=INT8_CPU_KERNEL),
                Verdict("transformers", True, "compressed-tensors",
                        ["transformers (compressed-tensors) rounds the inputs to int8 itself, with scale absmax/127.5 "
                         "where vLLM uses absmax/127: its logits differ from vLLM's by that"] + [TF_MOE_NOTE] * moe)]


class FloatQuantized(_Unpacked):
    """E4M3 values as they are, W = weight_scale * weight."""
    name, dtype, safetensors_dtype = "float-quantized", FP8, "F8_E4M3"

    def stored(self, qw):
        return qw.codes.to(FP8)

    def codes(self, w):
        return w, 0

    def runtimes(self, q, shapes, moe):
        inputs = "with the static input scale" if q.static_inputs else "per token"
        return [Verdict("vllm", True, f"compressed-tensors FP8 with {FP8_GPU_WEIGHT_ONLY} (Marlin) on an A100 (sm80)",
                        [f"on Ada, Hopper and Blackwell (sm89 and newer) vLLM runs it W8A8 with {FP8_GPU_KERNEL}, FP8 "
                         f"activations {inputs}; below sm89 the weights run through Marlin with 16-bit activations, "
                         "so the served model is slightly better than the recovery measured here"] + [MOE_NOTE] * moe,
                        kernel=FP8_GPU_WEIGHT_ONLY),
                self._cpu(q, moe),
                Verdict("transformers", True, "compressed-tensors",
                        ["transformers (compressed-tensors) rounds the inputs to FP8 as vLLM does"]
                        + [TF_MOE_NOTE] * moe)]

    def _cpu(self, q, moe) -> Verdict:
        if q.static_inputs:
            v = vllm.refused("vllm-cpu", FP8_STATIC_CPU_REFUSAL)
            v.notes.append(FP8_STATIC_AMX_NOTE)
            return v
        return Verdict("vllm-cpu", True, f"compressed-tensors FP8 with {FP8_CPU_KERNEL} on CPU",
                       ["FP8 activations per token through torch's scaled matmul (slow: for checking, not serving)"]
                       + [cpu_moe_note(FP8_MOE_REFUSAL)] * moe, kernel=FP8_CPU_KERNEL)


LAYOUTS = {cls.name: cls() for cls in (PackQuantized, IntQuantized, FloatQuantized)}
