"""CPU benchmark: quantfarm's GPTQ or AWQ on SmolLM2-135M side by side with llm-compressor, same session.

Both tools get the same fp16 checkpoint, the same calibration token blocks (quantfarm's C4
calibration, written to a file) and the same perplexity windows; they run one after the other,
never overlapped. Timed: the quantization call alone (wall and CPU seconds), peak RSS of the
process, and perplexity of the result.

    .venv/bin/python bench/cpu.py --algorithm gptq|awq|rtn --samples 128 --seq-len 512 --group-size 64 \
        [--peer-python /path/to/venv-with-llmcompressor/bin/python] [--act-order static|dynamic|none] \
        [--scheme W8A8|FP8_DYNAMIC|...] [--eval-skip WINDOWS]

--scheme: a named scheme (quantizers/schemes.py) for both tools, written as compressed-tensors by both; the
peer takes llm-compressor's preset of the same name. --eval-skip: perplexity on the windows after the first
WINDOWS of WikiText-2 validation (the job's report reads the first ones; WikiText-2 test is not on this machine).

GPTQ is symmetric with static act-order (both tools' default) and written as GPTQ; AWQ is
asymmetric (zero point) and written as AWQ GEMM by us, compressed-tensors by the peer.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(work: Path, samples: int, seq_len: int, seed: int, eval_skip: int = 0):
    """fp16 checkpoint of the demo model plus calibration and eval token files."""
    import torch
    from safetensors.torch import save_file

    from calibration import build_calibration, eval_tokens
    from service.job.steps import round_to_storage
    from service.job.loading import load_model
    from service.job.models import resolve_model

    model, tok = load_model(resolve_model("smollm2-135m"))
    round_to_storage(model)
    model_dir = work / "smollm2-fp16"
    if not model_dir.exists():
        model.to(torch.float16).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    calib = build_calibration("c4", tok, n_samples=samples, seq_len=seq_len, seed=seed)
    ev, _ = eval_tokens("wikitext2", tok)
    save_file({"tokens": calib.tokens.contiguous()}, str(work / "calib.safetensors"))
    save_file({"tokens": ev[eval_skip:].contiguous()}, str(work / "eval.safetensors"))
    return model_dir, calib.content_hash


def run_ours(a):
    """In a child process: time quantfarm's quantization alone, then perplexity of the artifact."""
    import torch
    from safetensors.torch import load_file

    from evaluation.text_metrics import perplexity
    from quantizers import artifact
    from quantizers.config import QuantConfig
    from quantizers.scheme import Scheme
    from quantizers.walk import quantize_model
    from quantizers.artifact import save
    from service.job.loading import load_model
    from service.job.models import resolve_model

    work = Path(a.work)
    model, tok = load_model(resolve_model(str(work / "smollm2-fp16")))
    tokens = load_file(str(work / "calib.safetensors"))["tokens"]
    ev = load_file(str(work / "eval.safetensors"))["tokens"]
    gptq = a.algorithm == "gptq"
    fmt = "compressed-tensors" if a.scheme else "gptq" if gptq else "awq"
    grid = Scheme(8, -1, True, named=a.scheme) if a.scheme else Scheme(a.bits, a.group_size, sym=gptq)
    cfg = QuantConfig(scheme=grid.replace(act_order=a.act_order if gptq else "none"),
                      algorithm=a.algorithm, true_sequential=not a.no_true_sequential, awq_duo=a.awq_duo,
                      awq_clip=not a.no_clip, search_dtype=a.search_dtype)
    cfg = artifact.with_scale_dtype(cfg, fmt, model)
    wall, cpu = time.perf_counter(), time.process_time()
    q, reports = quantize_model(model, tokens, cfg, "cpu")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = save(work / "ours-artifact", model, tok, q, cfg, fmt, {"quantizer": ["quantfarm:bench"]}, overwrite=True)
    loaded, _, _ = artifact.load_artifact(out, with_tokenizer=False)
    ppl = perplexity(loaded, ev, a.window_len, max_windows=a.windows)
    base = perplexity(load_model(resolve_model(str(work / "smollm2-fp16")))[0], ev, a.window_len, max_windows=a.windows)
    print("RESULT " + json.dumps({
        "tool": "quantfarm", "algorithm": a.algorithm, "scheme": a.scheme, "bits": cfg.scheme.bits,
        "group_size": cfg.scheme.group_size, "act_order": cfg.scheme.act_order.value, "true_sequential": cfg.true_sequential,
        **({"awq_duo": cfg.awq_duo, "awq_clip": cfg.awq_clip, "search_dtype": cfg.search_dtype}
           if a.algorithm == "awq" else {}),
        "n_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "threads": torch.get_num_threads(),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(peak, 1),
        "ppl": ppl, "baseline_ppl": base}), flush=True)


def child(cmd) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--algorithm", choices=["gptq", "awq", "rtn"], default="gptq")
    p.add_argument("--scheme", help="a named scheme for both tools (W8A8, FP8_DYNAMIC, ...)")
    p.add_argument("--eval-skip", type=int, default=0, help="windows of WikiText-2 validation to skip")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", choices=["static", "dynamic", "none"], default="static",
                   help="static is quantfarm's default and llm-compressor's (actorder static)")
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--awq-duo", choices=["duo", "both", "plain"], default="duo", help="AWQ scale grid")
    p.add_argument("--no-clip", action="store_true", help="AWQ without the clipping search")
    p.add_argument("--search-dtype", default="auto", help="AWQ block forwards: auto | float32 | bfloat16")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--peer-python", help="python of a venv with llmcompressor (ANCHORS.md says how to make one)")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ours_only:
        return run_ours(a)
    work = Path(a.work or tempfile.mkdtemp(prefix="qf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    _, calib_hash = prepare(work, a.samples, a.seq_len, a.seed, a.eval_skip * a.window_len)
    flags = ["--act-order", a.act_order, "--awq-duo", a.awq_duo, "--search-dtype", a.search_dtype] + \
        (["--no-true-sequential"] if a.no_true_sequential else []) + (["--no-clip"] if a.no_clip else [])
    common = ["--windows", str(a.windows), "--window-len", str(a.window_len)]
    scheme = ["--scheme", a.scheme] if a.scheme else []
    ours = child([sys.executable, __file__, "--ours-only", "--work", str(work), "--algorithm", a.algorithm, *scheme,
                  "--bits", str(a.bits),
                  "--group-size", str(a.group_size), *flags, *common])
    rows = [ours]
    if a.peer_python:
        peer = child([a.peer_python, str(ROOT / "bench" / "peer_llmc.py"), "--model-dir", str(work / "smollm2-fp16"),
                      "--calib", str(work / "calib.safetensors"), "--eval", str(work / "eval.safetensors"),
                      "--algorithm", a.algorithm, "--bits", str(a.bits), "--group-size", str(a.group_size),
                      "--sym" if a.algorithm == "gptq" else "--asym", *scheme,
                      *common, "--json-out", str(work / "peer.json")])
        rows.append(peer)
    what = f"{a.scheme} by {a.algorithm}" if a.scheme else \
        f"GPTQ w{a.bits} g{a.group_size} act-order {a.act_order}" if a.algorithm == "gptq" else \
        f"AWQ w{a.bits} g{a.group_size} zero-point"
    print(f"\nSmolLM2-135M {what}, {a.samples} x {a.seq_len} C4 tokens "
          f"(calibration hash {calib_hash[:12]}), {os.cpu_count()} CPUs, perplexity on {a.windows} x "
          f"{a.window_len} WikiText-2 validation tokens" + (f" after the first {a.eval_skip} windows" if a.eval_skip else ""))
    print(f"{'tool':<16}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}{'ppl':>9}{'fp16 ppl':>10}")
    for r in rows:
        print(f"{r['tool']:<16}{r['wall_s']:>9}{r['cpu_s']:>9}{r['peak_rss_mb']:>13}{r['ppl']:>9.3f}"
              f"{r.get('baseline_ppl', float('nan')):>10.3f}")
    if len(rows) == 2:
        print(f"speed-up (wall) x{rows[1]['wall_s'] / rows[0]['wall_s']:.2f}")
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
