"""GPU benchmark: quantfarm's GPTQ and AWQ on a Mistral-7B-shaped model with random bf16 weights,
side by side with llm-compressor on the same model in the same session (../shared/ANCHORS.md).

    python3 bench/gpu.py --layers 32 --algorithm gptq|awq [--check-layers 2] [--check-hessian] \
        [--peer 4,8] [--json-out results.json]

Timed for quantfarm: quantize_model (capturing layer 0's inputs, every layer's calibration
forwards, Hessians, search and quantization) plus packing every result into checkpoint tensors
(GPTQ or AWQ GEMM) on the GPU and copying them to host memory. Building the model is not timed.
Printed: total, fixed time (total minus the layers), seconds per layer, peak GPU memory, and each
layer's relative output error tr(E H E^T) / tr(W H W^T) per Linear group.

--check-layers K   re-runs the first K layers with every GPTQ group also quantized by the fp32
                   column-by-column reference loop on the same W and H; prints both errors
--check-hessian    layer 0: the fast (16-bit tensor-core, fp32 accumulate) Hessians against fp32
                   and fp64 accumulation of the same inputs, and what each does to GPTQ's error
--peer 4,8         llm-compressor 0.14 (GPTQModifier W4A16 / AWQModifier W4A16_ASYM, group 128)
                   on the same architecture with 4 and 8 layers, in a child process each; the
                   slope between them is its time per layer
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 32768


def build(layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, MistralConfig
    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=VOCAB,
                        max_position_embeddings=4096, head_dim=128)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def calibration(samples: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (samples, seq_len), generator=g)


def config(a):
    from quantizers.config import QuantConfig
    from quantizers.scheme import Scheme
    if a.algorithm == "gptq":   # llm-compressor's W4A16 defaults: symmetric, static act-order
        return QuantConfig(scheme=Scheme(4, a.group_size, sym=True, act_order="static"), batch_size=a.batch_size)
    return QuantConfig(algorithm="awq", scheme=Scheme(4, a.group_size, sym=False), batch_size=a.batch_size)


def pack(results: dict, algorithm: str) -> int:
    """Every result packed on the GPU and copied to host memory; returns the packed bytes."""
    from quantizers.formats.awq import AWQ
    from quantizers.formats.gptq import GPTQ
    from quantizers.grid import QuantizedWeight
    total = 0
    for qw in results.values():
        qw = QuantizedWeight(qw.codes.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.g_idx.cuda(), qw.bits,
                             qw.group_size, qw.sym)
        t = GPTQ().pack(qw, "gptq") if algorithm == "gptq" else AWQ().to_tensors(qw, torch.float16)
        total += sum(v.cpu().numel() * v.element_size() for v in t.values())
    return total


def layer_errors(reports) -> list[dict]:
    """Per layer: relative output error of each group (one value per distinct input)."""
    out = []
    for r in reports:
        seen = {}
        for n, info in r.modules.items():
            seen.setdefault(round(info.get("rel_error", float("nan")), 7), n)
        out.append({"layer": r.index, "seconds": round(r.seconds, 3),
                    "rel_error": {n: e for e, n in seen.items()}})
    return out


def run_ours(a) -> dict:
    from quantizers.walk import quantize_model
    model = build(a.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = calibration(a.samples, a.seq_len).cuda()
    cfg = config(a)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    results, reports = quantize_model(model, tokens, cfg, "cuda")
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    packed = pack(results, a.algorithm)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    layers = [r.seconds for r in reports]
    total = t2 - t0
    steady = layers[1:] or layers
    return {
        "tool": "quantfarm", "algorithm": a.algorithm, "layers": a.layers, "samples": a.samples, "seq_len": a.seq_len,
        "group_size": a.group_size, "seconds": round(total, 2), "quantize_seconds": round(t1 - t0, 2),
        "pack_seconds": round(t2 - t1, 2), "fixed_seconds": round(total - sum(layers), 2),
        "seconds_per_layer": round(sum(steady) / len(steady), 3), "first_layer_seconds": round(layers[0], 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
        "model_gib": round(model_bytes / 2 ** 30, 2), "peak_over_model_gib": round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 2),
        "packed_mib": round(packed / 2 ** 20, 1), "layer_errors": layer_errors(reports),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }


def check_layers(a) -> list[dict]:
    """Each GPTQ group of the first K layers, also through the fp32 reference loop on the same W and H."""
    from quantizers import gptq
    from quantizers.walk import quantize_model
    cfg = config(a)
    rows = []

    def on_group(layer, names, W, H, info):
        ref, ref_stats = gptq.quantize_weight(W, H, cfg.scheme, cfg.damp_percent, kernel="torch")
        fast = info["rel_error"]
        rows.append({"layer": layer, "group": names, "rel_error": fast, "reference_rel_error": ref_stats.rel_error,
                     "ratio": fast / ref_stats.rel_error})
        print(f"  check layer {layer} {'+'.join(n.split('.')[-1] for n in names):18s} fast {fast:.6f}  "
              f"reference {ref_stats.rel_error:.6f}  ratio {fast / ref_stats.rel_error:.4f}", flush=True)

    model = build(a.check_layers)
    quantize_model(model, calibration(a.samples, a.seq_len).cuda(), cfg, "cuda", on_group=on_group)
    return rows


@torch.no_grad()
def check_hessian(a) -> dict:
    """Layer 0's q/k/v and down_proj inputs accumulated three ways."""
    from quantizers import gptq
    from quantizers.layers import capture_layer_inputs, decoder_layers
    from quantizers.scheme import Scheme
    model = build(1)
    layers = decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, calibration(a.samples, a.seq_len).cuda(), a.batch_size, "cuda")
    layer = layers[0]
    acc = {}
    for name, mod in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        d = mod.in_features
        acc[name] = {"fast": gptq.HessianAccumulator(d, "cuda"), "fp32": torch.zeros(d, d, device="cuda"),
                     "fp64": torch.zeros(d, d, device="cuda", dtype=torch.float64), "mod": mod, "n": 0}

    def hook(name):
        def f(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            e = acc[name]
            e["fast"].add(x)
            e["fp32"].addmm_(x.float().t(), x.float())
            e["fp64"].addmm_(x.double().t(), x.double())
            e["n"] += x.shape[0]
        return f

    torch.backends.cuda.matmul.allow_tf32 = False
    hooks = [e["mod"].register_forward_pre_hook(hook(n)) for n, e in acc.items()]
    for h, kw in zip(hidden, kwargs):
        layer(h, **kw)
    for h in hooks:
        h.remove()
    out = {}
    for name, e in acc.items():
        truth = e["fp64"] * (2.0 / e["n"])
        H = {"fast": e["fast"].result().double(), "fp32": e["fp32"].double() * (2.0 / e["n"])}
        W = e["mod"].weight.float()
        row = {}
        for k, Hk in H.items():
            qw, _ = gptq.quantize_weight(W, Hk.float(), Scheme(bits=4, group_size=a.group_size, sym=True))
            Q = qw.dequantize()
            row[k] = {"rel_diff_vs_fp64": ((Hk - truth).norm() / truth.norm()).item(),
                      "gptq_rel_error_under_fp64_H": gptq.relative_error(W.double(), Q.double(), truth)}
        out[name] = row
        print(f"  hessian {name}: {json.dumps(row)}", flush=True)
    return out


# --- llm-compressor, in a child process that imports nothing from quantfarm ----------------------

def save_for_peer(layers: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    path = f"/tmp/qf-mistral-{layers}l"
    if not os.path.exists(path):
        model = build(layers)
        model.save_pretrained(path)
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2").save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def peer_child(algorithm: str, path: str, samples: int, seq_len: int, group_size: int) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if algorithm == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier
        recipe = AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = calibration(samples, seq_len)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(path), dataset=ds, recipe=recipe,
            max_seq_length=seq_len, num_calibration_samples=samples)
    torch.cuda.synchronize()
    return {"tool": "llmcompressor", "algorithm": algorithm, "seconds": round(time.perf_counter() - t, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def run_peer(a, layers: int) -> dict:
    path = save_for_peer(layers)
    cmd = [sys.executable, __file__, "--_peer", path, "--algorithm", a.algorithm, "--samples", str(a.samples),
           "--seq-len", str(a.seq_len), "--group-size", str(a.group_size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"layers": layers, **json.loads(line[7:])}
    return {"layers": layers, "error": (out.stderr or out.stdout)[-3000:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--algorithm", choices=["gptq", "awq"], default="gptq")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--check-layers", type=int, default=0)
    p.add_argument("--check-hessian", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of our run")
    p.add_argument("--peer", default="", help="comma-separated layer counts for llm-compressor")
    p.add_argument("--json-out")
    p.add_argument("--_peer", dest="peer_path", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer_path:
        print("RESULT " + json.dumps(peer_child(a.algorithm, a.peer_path, a.samples, a.seq_len, a.group_size)), flush=True)
        return
    result = {}
    if not a.skip_ours:
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                result["ours"] = run_ours(a)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
        else:
            result["ours"] = run_ours(a)
        r = result["ours"]
        print(f"quantfarm {a.algorithm} {a.layers} layers: {r['seconds']} s total, {r['seconds_per_layer']} s/layer "
              f"(first {r['first_layer_seconds']}), fixed {r['fixed_seconds']} s (pack {r['pack_seconds']}), "
              f"peak {r['peak_gpu_gib']} GiB (model {r['model_gib']})", flush=True)
        for e in r["layer_errors"]:
            print(f"  layer {e['layer']:2d} {e['seconds']:7.3f} s  " +
                  "  ".join(f"{n.split('.')[-1]} {v:.5f}" for n, v in e["rel_error"].items()), flush=True)
        torch.cuda.empty_cache()
    if a.check_layers:
        result["check"] = check_layers(a)
    if a.check_hessian:
        result["hessian"] = check_hessian(a)
    if a.peer:
        result["peer"] = [run_peer(a, int(n)) for n in a.peer.split(",")]
        for r in result["peer"]:
            print(f"llm-compressor {a.algorithm} {r['layers']} layers: {json.dumps(r)}", flush=True)
        ok = [r for r in result["peer"] if "seconds" in r]
        if len(ok) >= 2:
            slope = (ok[-1]["seconds"] - ok[0]["seconds"]) / (ok[-1]["layers"] - ok[0]["layers"])
            result["peer_slope"] = round(slope, 2)
            result["peer_fixed"] = round(ok[0]["seconds"] - slope * ok[0]["layers"], 2)
            print(f"llm-compressor: {slope:.2f} s/layer, fixed {result['peer_fixed']} s, "
                  f"32-layer estimate {result['peer_fixed'] + 32 * slope:.0f} s", flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
