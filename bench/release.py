"""A release against the same variants run as separate jobs: what sharing the variant-independent work saves.

    .venv/bin/python bench/release.py [--model smollm2-135m] [--preset vllm] [--samples 32] [--windows 16]
        [--suite quick] [--work DIR]

First every variant as its own `pipeline.run` (no shared state, no baseline cache: each resolves, builds its
calibration set and evaluates the fp16 model itself, as separate `quantfarm quantize` runs would), then the
same variants as one `release.run`. Prints per-variant and total wall seconds of both and checks that each
variant's tensors are equal either way (sharing must change no number).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from service.job import pipeline, release
from service.job.release import ReleaseSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="vllm")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-release-"))
    rs = ReleaseSpec(model=a.model, preset=a.preset, calibration={"samples": a.samples, "seq_len": a.seq_len},
                     evaluation={"suite": a.suite, "windows": a.windows})
    from service.job.models import resolve_model
    src = resolve_model(a.model)
    jobs = rs.jobs(src.revision or src.content_hash, release.input_widths(src))

    alone = {}
    t0 = time.perf_counter()
    for name, job, _ in jobs:
        t = time.perf_counter()
        pipeline.run(job, work / "alone" / name, device="cpu", cache_dir=None)
        alone[name] = time.perf_counter() - t
    alone_total = time.perf_counter() - t0

    t0 = time.perf_counter()
    s = release.run(rs, work / "release", device="cpu", cache_dir=None)
    release_total = time.perf_counter() - t0

    same = True
    for name, _, _ in jobs:
        x, y = (load_file(work / d / name / "model.safetensors") for d in ("alone", "release"))
        same &= x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
    rows = [{"variant": r["variant"], "alone_s": round(alone[r["variant"]], 1), "in_release_s": round(r["seconds"], 1),
             "recovery": r["recovery"]} for r in s["variants"]]
    out = {"model": a.model, "preset": a.preset, "calibration": f"{a.samples} x {a.seq_len}", "suite": a.suite,
           "windows": a.windows, "variants": rows, "separate_jobs_s": round(alone_total, 1),
           "release_s": round(release_total, 1), "saving": round(1 - release_total / alone_total, 3),
           "shared": s["shared"], "tensors_equal": same}
    print(json.dumps(out, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
