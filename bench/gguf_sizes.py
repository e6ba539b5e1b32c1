"""GGUF sizes of SmolLM2-135M with and without an importance matrix, evaluated by llama.cpp itself.

For each type of the `gguf` release preset and each importance matrix (none, quantfarm's from the
calibration forward, llama.cpp's llama-imatrix on the same calibration text): file size, bits per
weight, llama-perplexity's perplexity on WikiText-2 validation and KLD against the F16 file.

    .venv/bin/python bench/gguf_sizes.py [--samples 32] [--seq-len 512] [--chunks 32] [--types Q2_K,Q4_K_M]

Prints a markdown table (BENCHMARKS.md, "GGUF") and a JSON line.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration import build_calibration, eval_tokens  # noqa: E402
from quantizers import imatrix, llama_cpp  # noqa: E402
from quantizers.formats.gguf import PRESET, file_summary  # noqa: E402
from service.job.loading import fp16_folder, load_model  # noqa: E402
from service.job.models import resolve_model  # noqa: E402
from service.job.steps import round_to_storage  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--types", default=",".join(PRESET))
    ap.add_argument("--imatrix", default="none,quantfarm,llama")
    a = ap.parse_args()
    t = llama_cpp.tools()
    src = resolve_model("smollm2-135m")
    model, tok = load_model(src)
    round_to_storage(model)
    calib = build_calibration("c4", tok, n_samples=a.samples, seq_len=a.seq_len, seed=0)
    ev, _ = eval_tokens("wikitext2", tok)
    times = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        f16 = d / "f16.gguf"
        llama_cpp.convert(t, fp16_folder(src), f16, "SmolLM2-135M")
        times["convert"] = time.perf_counter() - t0
        text = d / "eval.txt"
        text.write_text(tok.decode(ev[:(a.chunks + 1) * 1024], skip_special_tokens=True))
        base = llama_cpp.perplexity(t, f16, text, 512, a.chunks, save_base=d / "base.bin")
        mats = {"none": None}
        for kind in a.imatrix.split(","):
            if kind != "none":
                t0 = time.perf_counter()
                mats[kind] = imatrix.make_file(kind, model, calib, f16, tok, t, "cpu", d / f"imatrix-{kind}.gguf")
                times[f"imatrix_{kind}"] = time.perf_counter() - t0
        rows = []
        for typ in a.types.split(","):
            for kind, m in mats.items():
                if kind == "none" and typ in ("IQ2_XS", "IQ2_XXS"):
                    continue
                q = d / f"{typ}-{kind}.gguf"
                t0 = time.perf_counter()
                llama_cpp.quantize(t, f16, q, typ, m)
                qs = time.perf_counter() - t0
                r = llama_cpp.perplexity(t, q, None, 512, a.chunks, kld_base=d / "base.bin")
                sizes = file_summary(q)
                rows.append({"type": typ, "imatrix": kind, "mib": q.stat().st_size / 2 ** 20,
                             "bpw": sizes["bits_per_weight"]["overall"], "quantize_s": qs, **r})
                q.unlink()
    print(f"F16: perplexity {base['perplexity']:.4f}; calibration {a.samples} x {a.seq_len} C4 tokens; "
          f"{a.chunks} chunks of 512 WikiText-2 validation tokens\n")
    print("| type | imatrix | MiB | bits/weight | perplexity | KLD mean | KLD p99 | same top token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['imatrix']} | {r['mib']:.1f} | {r['bpw']:.2f} | {r['perplexity']:.4f} | "
              f"{r['kld']:.5f} | {r['kld_p99']:.4f} | {100 * r['same_top_p']:.1f}% |")
    print(json.dumps({"f16": base, "times": times, "rows": rows}))


if __name__ == "__main__":
    main()
