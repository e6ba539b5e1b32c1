"""Evaluation speed: quantfarm's prefix-sharing lm-eval adapter against lm-eval's own HFLM, same session.

Both score the same lm-eval requests (the leaderboard tasks' log-likelihood requests, built once by
lm-eval from the local data) with the same model object, batch size and max length, one after the
other. Timed: the `loglikelihood` call alone. Checked: every request's log-likelihood and greedy flag
against HFLM's, so the speed is not bought with a different answer.

    .venv/bin/python bench/eval_speed.py --tasks arc_challenge,hellaswag,mmlu,winogrande,truthfulqa_mc2 \
        --limit 40 [--device cpu] [--batch-size 8] [--json-out result.json]

GSM8K is left out: it is generated (HFLM's own path in both adapters), not scored by log-likelihood.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def requests_of(name: str, folder, limit: int):
    """lm-eval's log-likelihood Instances for one of our task names (MMLU: `limit` spread over subjects)."""
    from evaluation import leaderboard

    tasks = leaderboard.build_tasks([name], folder, mmlu_limit=limit)
    out = []
    for task in tasks.values():
        task.build_all_requests(limit=None if name == "mmlu" else limit)
        out += [i for i in task.instances if i.request_type == "loglikelihood"]
    return out


def timed(lm, instances):
    started, cpu = time.perf_counter(), time.process_time()
    got = lm.loglikelihood(instances, disable_tqdm=True)
    return got, time.perf_counter() - started, time.process_time() - cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu,winogrande,truthfulqa_mc2")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json-out")
    args = p.parse_args(argv)

    import torch

    from calibration import data_dir
    from evaluation.leaderboard import lm_eval_version, lm_for
    from service.job.context import compute_dtype, pick_device
    from service.job.steps import round_to_storage
    from service.job.loading import load_model
    from service.job.models import resolve_model

    dev = pick_device(args.device)
    model, tok = load_model(resolve_model(args.model), dtype=compute_dtype(dev))
    round_to_storage(model)
    model = model.to(dev).eval()
    folder = data_dir()
    rows = []
    for name in args.tasks.split(","):
        inst = requests_of(name, folder, args.limit)
        base, t_base, c_base = timed(lm_for(model, tok, args.batch_size, share_prefix=False), inst)
        ours, t_ours, c_ours = timed(lm_for(model, tok, args.batch_size), inst)
        dll = max(abs(a[0] - b[0]) for a, b in zip(base, ours))
        greedy_same = sum(a[1] == b[1] for a, b in zip(base, ours))
        rows.append({"task": name, "requests": len(inst), "hflm_s": round(t_base, 2), "prefix_s": round(t_ours, 2),
                     "hflm_cpu_s": round(c_base, 2), "prefix_cpu_s": round(c_ours, 2),
                     "speedup": round(t_base / t_ours, 2), "max_abs_dll": dll,
                     "greedy_agree": f"{greedy_same}/{len(inst)}"})
        print(json.dumps(rows[-1]), flush=True)
    total = {k: round(sum(r[k] for r in rows), 2) for k in ("hflm_s", "prefix_s")}
    result = {"model": args.model, "device": str(dev), "dtype": str(compute_dtype(dev)), "limit": args.limit,
              "batch_size": args.batch_size, "torch": torch.__version__, "lm_eval": lm_eval_version(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": rows, "total": total,
              "speedup": round(total["hflm_s"] / total["prefix_s"], 2)}
    print("RESULT " + json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0 if all(r["max_abs_dll"] < 1e-3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
