"""Time to make SmolLM2-135M's `gguf` release set: quantfarm against llama.cpp's tools run by hand.

quantfarm: `quantfarm release smollm2-135m --variants gguf --suite none` (resolve, calibration, one F16
conversion, quantfarm's importance matrix from the calibration forward, six llama-quantize runs), with
empty GGUF caches. By hand: what a user runs with llama.cpp alone on the same calibration text:
convert_hf_to_gguf.py, llama-imatrix, then llama-quantize per type.

    .venv/bin/python bench/gguf_release.py [--samples 32] [--seq-len 512]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from calibration import build_calibration  # noqa: E402
from quantizers import llama_cpp  # noqa: E402
from quantizers.formats.gguf import PRESET  # noqa: E402
from service.job.loading import fp16_folder, load_model  # noqa: E402
from service.job.models import resolve_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    t = llama_cpp.tools()
    src = resolve_model("smollm2-135m")
    folder = fp16_folder(src)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        # by hand
        _, tok = load_model(src)
        calib = build_calibration("c4", tok, n_samples=a.samples, seq_len=a.seq_len, seed=0)
        text = d / "calib.txt"
        text.write_text("\n\n".join(tok.decode(r, skip_special_tokens=True) for r in calib.tokens))
        t0 = time.perf_counter()
        llama_cpp.convert(t, folder, d / "f16.gguf", "SmolLM2-135M")
        t1 = time.perf_counter()
        llama_cpp.imatrix(t, d / "f16.gguf", text, d / "imatrix.gguf", ctx=a.seq_len, chunks=a.samples)
        t2 = time.perf_counter()
        for typ in PRESET:
            llama_cpp.quantize(t, d / "f16.gguf", d / f"{typ}.gguf", typ, d / "imatrix.gguf")
        t3 = time.perf_counter()
        hand = {"convert": t1 - t0, "imatrix": t2 - t1, "quantize": t3 - t2, "total": t3 - t0}
        # quantfarm, with its GGUF caches empty
        env = {**os.environ, "QUANTFARM_CACHE": str(d / "cache"), "QUANTFARM_LLAMA_CPP": str(t.root),
               "HF_HUB_OFFLINE": "1"}
        (d / "cache").mkdir()
        os.symlink(folder.parent, d / "cache" / "gguf")          # the source's fp16 folder, as in any warm run
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "service.cli", "release", "smollm2-135m", "--variants", "gguf",
                        "--samples", str(a.samples), "--seq-len", str(a.seq_len), "--suite", "none", "--out",
                        str(d / "rel")], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        ours = time.perf_counter() - t0
    print(f"by hand (convert + llama-imatrix + {len(PRESET)} x llama-quantize): {hand['total']:.1f} s "
          f"(convert {hand['convert']:.1f}, imatrix {hand['imatrix']:.1f}, quantize {hand['quantize']:.1f})")
    print(f"quantfarm release --variants gguf --suite none (process start, load, calibration included): {ours:.1f} s")


if __name__ == "__main__":
    main()
