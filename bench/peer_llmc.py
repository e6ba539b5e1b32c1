"""Peer benchmark: llm-compressor's GPTQ / AWQ on CPU, measured the way quantfarm is measured.

Run it with the PEER's python (a venv holding llmcompressor); it imports nothing from quantfarm:

    python bench/peer_llmc.py --model-dir DIR --calib calib.safetensors --eval eval.safetensors \
        --algorithm gptq|awq|rtn --bits 4 --group-size 64 [--sym|--asym] [--scheme W8A8|FP8_DYNAMIC|...] \
        --windows 32 --window-len 512 [--baseline] --json-out result.json

--model-dir   plain transformers checkpoint (fp16 safetensors + tokenizer); loaded in float32
--calib       safetensors, key "tokens": int64 [n_samples, seq_len] calibration samples
--eval        safetensors, key "tokens": 1-D int64 held-out token stream
--baseline    also measure the unquantized model's perplexity (in a child process, before
              quantizing, so that its memory does not count in the peak RSS of the oneshot call)

Timed: the oneshot() call alone (wall seconds, CPU seconds of this process and its children,
peak RSS of this process). Perplexity, identical to quantfarm's definition: the first `windows`
non-overlapping windows of `window_len` tokens from the start of the eval stream; logits at
positions 0..L-2 predict tokens 1..L-1; ppl = exp(mean NLL over all predicted tokens), float32,
batch size 8, use_cache=False. The quantized model is evaluated as oneshot leaves it in memory.

Prints one line "RESULT {json}" and writes the same JSON to --json-out. If oneshot raises (e.g. a
group size that does not divide 576), the JSON carries "error" and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

EVAL_BATCH = 8


def _rss_mb_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water RSS mark of this process (Linux >= 4.0, clear_refs "5") so
    that VmHWM afterwards covers only what follows. ru_maxrss is not reset by this on all kernels,
    so both are reported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat, all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    # fp32 on CPU: on these CPUs fp16/bf16 matmul is about 2.5x slower than fp32.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, windows: int, window_len: int) -> float:
    stream = stream.reshape(-1).to(torch.int64)
    need = windows * window_len
    if stream.numel() < need:
        raise ValueError(f"eval stream has {stream.numel()} tokens, {need} needed")
    x = stream[:need].view(windows, window_len)
    nlls = []
    for i in range(0, windows, EVAL_BATCH):
        xb = x[i : i + EVAL_BATCH]
        logits = model(input_ids=xb, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="none"
        )
        nlls.append(nll)
        del logits
    # per-token NLL in float32, summed in float64 (as quantfarm's evaluation/text_metrics.py does)
    return math.exp(torch.cat(nlls).double().mean().item())


def baseline_in_child(args) -> float:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--_ppl-only",
        "--model-dir", args.model_dir, "--eval", args.eval,
        "--windows", str(args.windows), "--window-len", str(args.window_len),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("PPL "):
            return float(line.split()[1])
    raise RuntimeError(f"baseline child printed no PPL line:\n{out.stdout}\n{out.stderr}")


def build_recipe(args, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if args.scheme:          # llm-compressor's own preset: GPTQModifier for gptq, QuantizationModifier (RTN) for rtn
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        modifier = GPTQModifier if args.algorithm == "gptq" else QuantizationModifier
        return [modifier(targets="Linear", ignore=["lm_head"], scheme=args.scheme)]

    if args.group_size > 0:
        strategy, group_size = "group", args.group_size
    else:
        strategy, group_size = "channel", None
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=symmetric, strategy=strategy,
        group_size=group_size,
    )
    config_groups = {
        "group_0": QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=None, output_activations=None
        )
    }
    if args.algorithm == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        # llm-compressor's defaults otherwise: actorder "static", block_size 128,
        # dampening_frac 0.01.
        return [GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups=config_groups)]

    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # The 0.14 API: AWQ is a transform (scale search, folded into the weights) followed by a
    # quantization modifier (the old llmcompressor.modifiers.awq.AWQModifier shim builds exactly
    # this pair). Defaults: duo_scaling True, n_grid 20, mappings inferred for Llama.
    return [
        AWQModifier(),
        QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=config_groups),
    ]


def patch_pin_memory_for_cpu() -> bool:
    """llm-compressor 0.14's AWQ pins its cached activations (IntermediatesCache.pin_memory,
    called from AWQModifier._apply_smoothing) for faster host-to-device copies. Pinning needs an
    accelerator; on a CPU-only machine it raises. With no accelerator the copies are CPU to CPU,
    so pinning is pointless: make Tensor.pin_memory the identity. This is the only patch."""
    if torch.accelerator.is_available():
        return False
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    return True


def check_levels(model, bits: int, group_size: int) -> int:
    """Largest number of distinct weight values in any quantization group of the first
    quantized Linear's weight (sanity: must be <= 2**bits)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith("q_proj"):
            w = mod.weight.detach().float()
            if group_size <= 0:
                groups = w
            else:
                groups = w.reshape(w.shape[0], -1, group_size).reshape(-1, group_size)
            return int(max(torch.unique(g).numel() for g in groups))
    return -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib")
    p.add_argument("--eval", required=True)
    p.add_argument("--algorithm", choices=["gptq", "awq", "rtn"], default="gptq")
    p.add_argument("--scheme", help="one of llm-compressor's preset schemes (W8A8, FP8_DYNAMIC, ...): the grid and "
                                    "activations are the preset's; --bits/--group-size are then only reported")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="<= 0: per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--json-out")
    p.add_argument("--_ppl-only", dest="ppl_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    eval_tokens = load_file(args.eval)["tokens"]
    if args.ppl_only:
        model = load_model(args.model_dir)
        print(f"PPL {perplexity(model, eval_tokens, args.windows, args.window_len)!r}", flush=True)
        return 0
    if not args.calib:
        p.error("--calib is required")

    symmetric = (args.algorithm == "gptq") if args.sym is None else args.sym

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    calib = load_file(args.calib)["tokens"].to(torch.int64)
    if calib.dim() != 2:
        raise ValueError(f"calib tokens must be [n_samples, seq_len], got {tuple(calib.shape)}")
    n_samples, seq_len = calib.shape

    result = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "algorithm": args.algorithm,
        "scheme": args.scheme,
        "settings": {
            "bits": args.bits,
            "group_size": args.group_size,
            "symmetric": symmetric,
            "targets": "Linear",
            "ignore": ["lm_head"],
            "compute_dtype": "float32",
            "threads": torch.get_num_threads(),
            "windows": args.windows,
            "window_len": args.window_len,
            **({"actorder": "static (llm-compressor default)"} if args.algorithm == "gptq" else {}),
        },
        "model_dir": os.path.abspath(args.model_dir),
        "calib": os.path.abspath(args.calib),
        "eval": os.path.abspath(args.eval),
        "n_samples": int(n_samples),
        "seq_len": int(seq_len),
        "patches": [],
    }

    if args.baseline:
        t0 = time.perf_counter()
        result["baseline_ppl"] = baseline_in_child(args)
        result["baseline_eval_s"] = time.perf_counter() - t0

    if args.algorithm == "awq" and patch_pin_memory_for_cpu():
        result["patches"].append("torch.Tensor.pin_memory -> identity (no accelerator)")

    model = load_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    recipe = build_recipe(args, symmetric)
    result["rss_before_mb"] = round(_rss_mb_now(), 1)
    result["peak_rss_before_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    hwm_reset = _reset_peak_rss()

    load0 = os.getloadavg()
    busy0 = _machine_busy_s()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    error = None
    try:
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            max_seq_length=int(seq_len),
            num_calibration_samples=int(n_samples),
            shuffle_calibration_samples=False,
        )
    except Exception as e:  # reported in the JSON; the exit status says it failed
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)

    result.update(
        wall_s=round(wall, 3),
        cpu_s=round(cpu + child_cpu, 3),
        cpu_user_s=round(ru1.ru_utime - ru0.ru_utime, 3),
        cpu_sys_s=round(ru1.ru_stime - ru0.ru_stime, 3),
        cpu_children_s=round(child_cpu, 3),
        peak_rss_mb=round(ru1.ru_maxrss / 1024, 1),  # ru_maxrss is KiB on Linux: this is MiB
    )
    # Other processes on the machine inflate wall time (and, with OpenMP spin-waiting, CPU time):
    # the 1-minute load average before and after the call says whether the run was alone.
    result["loadavg_1min_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    result["other_processes_cpu_s"] = round(_machine_busy_s() - busy0 - result["cpu_s"], 1)
    if hwm_reset:  # peak RSS during the oneshot call alone (model load excluded)
        result["peak_rss_oneshot_mb"] = round(_vm_hwm_mb(), 1)

    if error is None:
        result["max_levels_per_group"] = check_levels(model, args.bits, args.group_size)
        t0 = time.perf_counter()
        result["ppl"] = perplexity(model, eval_tokens, args.windows, args.window_len)
        result["eval_s"] = round(time.perf_counter() - t0, 3)
    else:
        result["error"] = error if len(error) <= 1500 else error[:1500] + f" ... [{len(error)} chars]"
        result["ppl"] = None

    line = json.dumps(result)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print("RESULT " + line, flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
