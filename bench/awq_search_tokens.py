"""AWQ's scale search on fewer tokens: time and perplexity of SmolLM2-135M AWQ w4 for each cap on the
tokens the search scores candidates on (QuantConfig.awq_search_tokens; 0 = all calibration tokens).

    .venv/bin/python bench/awq_search_tokens.py --samples 32 --search-dtype float32 --tokens 0,8192,4096

To see a CPU without AMX on one that has it, run it under
`ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`. Prints one RESULT line
(JSON) per cap: wall and CPU seconds of the quantization call, perplexity of the in-memory model.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--search-dtype", default="float32", help="auto | float32 | bfloat16")
    p.add_argument("--tokens", default="0,8192,4096", help="comma list of caps (0: every token)")
    p.add_argument("--windows", type=int, default=32)
    a = p.parse_args(argv)

    from calibration import build_calibration, eval_tokens
    from evaluation.text_metrics import perplexity
    from quantizers.config import QuantConfig
    from quantizers.scheme import Scheme
    from quantizers.walk import quantize_model
    from service.cli.main import quiet_third_party
    from service.job.steps import round_to_storage
    from service.job.loading import load_model
    from service.job.models import resolve_model

    quiet_third_party()
    base, tok = load_model(resolve_model("smollm2-135m"))
    round_to_storage(base)
    ev, _ = eval_tokens("wikitext2", tok)
    calib = build_calibration("c4", tok, n_samples=a.samples, seq_len=a.seq_len, seed=0)
    for cap in (int(x) for x in a.tokens.split(",")):
        model = copy.deepcopy(base)
        cfg = QuantConfig(scheme=Scheme(group_size=a.group_size, sym=False), algorithm="awq", search_dtype=a.search_dtype, awq_search_tokens=cap)
        t, c = time.perf_counter(), time.process_time()
        quantize_model(model, calib.tokens, cfg, "cpu")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        ppl = perplexity(model, ev, 512, max_windows=a.windows)
        print("RESULT " + json.dumps({"samples": a.samples, "search_tokens": cap, "dtype": a.search_dtype,
                                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "ppl": round(ppl, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
