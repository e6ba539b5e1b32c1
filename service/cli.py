"""The `quantfarm` command line."""
import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from .errors import QuantfarmError


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless it is unset (None/False) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)" if text else "default: %(default)s"
        return text


def _spec_arguments(p):
    """The JobSpec settings, shared by `quantize` (runs here) and `submit` (runs on the farm)."""
    p.add_argument("model", help="smollm2-135m (built-in demo), a Hugging Face id org/name, a local folder, or a .gguf file")
    p.add_argument("--revision", help="Hub branch, tag or commit (pinned to a commit sha)")
    p.add_argument("--algorithm", default="gptq", choices=["gptq", "awq", "rtn"], help="how weights are quantized")
    p.add_argument("--format", default="gptq", choices=["gptq", "awq", "compressed-tensors"],
                   help="how they are stored (awq: 4-bit AWQ GEMM; compressed-tensors: pack-quantized, vLLM-native)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="columns per group; -1 for one group per row")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid (default for gptq and rtn)")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric grid (always for awq; GPTQ writes it as gptq_v2)")
    p.add_argument("--act-order", choices=["static", "dynamic", "none"], default="static",
                   help="column order by descending Hessian diagonal: static (default; groups keep their natural "
                        "columns, so g_idx stays monotonic and inference pays nothing), dynamic (groups formed in "
                        "that order: classic desc_act, non-monotonic g_idx), or none")
    p.add_argument("--desc-act", dest="act_order", action="store_const", const="dynamic",
                   help="same as --act-order dynamic")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="collect all inputs of a layer at once instead of group by group")
    p.add_argument("--damp", type=float, default=0.01, help="damping as a fraction of mean(diag H)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="leave these decoder modules in 16 bits on purpose (fnmatch on full names, e.g. "
                        "'*.shared_expert.*'); repeatable. Without it a job fails if under 99%% of the "
                        "decoder layers' weight matrices can be quantized")
    p.add_argument("--calibration", default="auto",
                   help="auto | c4 | wikitext2 | model | FILE.txt | FILE.jsonl | hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration samples (default {GPU_SIZING['samples']}; `quantize` on a CPU: "
                        f"{CPU_SIZING['samples']})")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0)
    _eval_arguments(p)
    p.add_argument("--no-eval", dest="suite", action="store_const", const="none", help="same as --suite none")
    p.add_argument("--min-recovery", type=float,
                   help="quality gate: recovery below this fails the job (failed_quality; the artifact is kept)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _eval_arguments(p):
    p.add_argument("--suite", default="quick",
                   help="quick (perplexity + KLD on held-out text) | leaderboard (ARC-Challenge, HellaSwag, MMLU, "
                        "TruthfulQA mc2, Winogrande, GSM8K through lm-eval) | none | a comma list of parts")
    p.add_argument("--limit", "--eval-limit", dest="eval_limit", type=int,
                   help="at most N items per task (MMLU: spread over its subjects) and N text windows: a quick run")
    p.add_argument("--eval-text", help="held-out text for perplexity/KLD (default: WikiText-2 validation when present)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help=f"text windows of 512 tokens (default {GPU_SIZING['windows']}; `quantize` on a CPU: "
                        f"{CPU_SIZING['windows']})")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--data-dir", help="task data folder (default: the shared data folder, QUANTFARM_DATA)")


def _given(**kw) -> dict:
    """The options the user set: unset ones (None) take the JobSpec's defaults."""
    return {k: v for k, v in kw.items() if v is not None}


def evaluation_from_args(a) -> dict:
    suite = a.suite.split(",") if "," in a.suite else a.suite
    return {"suite": suite, "text": a.eval_text, "limit": a.eval_limit, "batch_size": a.eval_batch_size,
            "data_dir": a.data_dir, **_given(windows=a.eval_windows)}


def spec_from_args(a, **extra):
    from .spec import JobSpec
    return JobSpec(model=a.model, revision=a.revision, algorithm=a.algorithm, format=a.format, bits=a.bits,
                   group_size=a.group_size, sym=a.sym, desc_act=a.act_order != "none",
                   static_groups=a.act_order == "static",
                   true_sequential=a.true_sequential, damp_percent=a.damp, keep=a.keep,
                   calibration={"source": a.calibration, "seq_len": a.seq_len, "seed": a.seed,
                                **_given(samples=a.samples)},
                   evaluation=evaluation_from_args(a), min_recovery=a.min_recovery,
                   allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code, **extra)


# Calibration samples and evaluation windows (of 512 tokens) when the user sets neither: the JobSpec's
# defaults on a GPU; `quantize` on a CPU takes a quarter of the calibration and half the windows, so a
# first run of the demo model ends in about two minutes on two cores (BENCHMARKS.md, "Set-up and demo").
GPU_SIZING = {"samples": 128, "windows": 32}
CPU_SIZING = {"samples": 32, "windows": 16}


def size_for_device(a, device) -> str | None:
    """Fill unset --samples/--eval-windows for a CPU run; returns the sentence the summary prints."""
    if device.type != "cpu" or (a.samples is not None and a.eval_windows is not None):
        return None
    a.samples = CPU_SIZING["samples"] if a.samples is None else a.samples
    a.eval_windows = CPU_SIZING["windows"] if a.eval_windows is None else a.eval_windows
    return (f"sized for a CPU: {a.samples} x {a.seq_len} calibration tokens, {a.eval_windows} x 512 evaluation "
            f"tokens (GPU defaults {GPU_SIZING['samples']} and {GPU_SIZING['windows']}; set --samples and "
            "--eval-windows to choose)")


def _quantize_parser(sub):
    p = sub.add_parser("quantize", help="quantize a model into a standard checkpoint folder", formatter_class=HelpWithDefaults)
    _spec_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--state-dir", help="per-layer checkpoints: a rerun with the same folder resumes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-baseline-cache", action="store_true", help="recompute the fp16 baseline, store nothing")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a) -> int:
    from tqdm import tqdm

    from . import pipeline

    sizing = size_for_device(a, pipeline.pick_device(a.device))
    spec = spec_from_args(a)
    bar = None

    def on_step(step):
        if bar is not None:
            bar.clear()          # a step line never runs into the progress bar
        print(f"[quantfarm] {step}", file=sys.stderr, flush=True)

    def on_layer(rep, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=rep.index, desc="layers", unit="layer", file=sys.stderr)
        worst = max((m.get("rel_error", 0.0) for m in rep.modules.values()), default=0.0)
        bar.set_postfix_str(f"{rep.seconds:.1f}s, worst rel err {worst:.2e}")
        bar.update(1)
        if bar.n >= total:
            bar.close()

    try:
        r = pipeline.run(spec, a.out, device=a.device, state_dir=a.state_dir, overwrite=a.overwrite,
                         cache_dir=baseline_cache(a), on_step=on_step, on_layer=on_layer)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        done = bar.n if bar is not None else 0
        hint = (f"rerun the same command to resume from the {done} finished layers in {a.state_dir}" if a.state_dir
                else "nothing was kept; with --state-dir DIR finished layers are saved and a rerun resumes")
        print(f"\nquantfarm: interrupted; {hint}", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    mb = 2 ** 20
    print(f"\nartifact     {r.artifact}")
    print(f"model        {r.model} @ {r.revision}")
    act = r.preflight["settings"]["act_order"]
    print(f"format       {spec.format} {spec.bits}-bit g{spec.group_size} {'sym' if spec.symmetric else 'asym'}"
          f"{' act-order ' + act if act != 'none' else ''} ({spec.algorithm})")
    if spec.algorithm != "rtn":
        c = spec.calibration
        print(f"calibration  {c.samples} x {c.seq_len} tokens ({r.calibration_source})")
    if sizing:
        print(f"note         {sizing}")
    print(f"time         {r.seconds['total']:.1f} s total, {r.seconds['quantize']:.1f} s quantizing")
    print(f"size         {r.size_before_bytes / mb:.1f} MiB (16-bit) -> {r.size_after_bytes / mb:.1f} MiB")
    from .preflight import coverage_line, runtime_line, runtime_notes
    for v in r.preflight["runtimes"]:
        print(f"{v['runtime']:<13}{runtime_line(v)}")
    for v in r.preflight["runtimes"]:
        for n in runtime_notes(v):
            print(f"note         {v['runtime']}: {n}")
    c = r.coverage
    if c:
        print("coverage     " + coverage_line(c["fraction"], f" ({len(c['kept'])} kept 16-bit on purpose)" if c["kept"] else ""))
    if r.evaluation:
        print()
        print(report_text(r.evaluation))
    return gate_exit(spec.min_recovery, r.evaluation)


def baseline_cache(a):
    from .server import default_home
    return None if a.no_baseline_cache else default_home() / "baselines"


def report_text(ev: dict) -> str:
    from evaluation import report
    out = [report.text_table(report.recovery_rows(ev))]
    if ev.get("kld"):
        out += ["", "KL divergence (fp16 || quantized) on " + str(ev["text"]), report.text_table(report.kld_rows(ev["kld"]))]
    cache = ev.get("baseline_cache") or {}
    reused = [k for k, v in cache.items() if v == "hit"]
    fresh = [k for k, v in cache.items() if v != "hit"]
    said = ([f"reused from the baseline cache for {', '.join(reused)}"] if reused else []) + \
           ([f"computed in this run for {', '.join(fresh)}"] if fresh else [])
    out += ["", *report.notes(ev)] + (["fp16 scores: " + "; ".join(said) + "."] if said else [])
    return "\n".join(out)


def gate_exit(min_recovery, evaluation: dict) -> int:
    """3 when a quality gate is set and not met (the artifact stays for inspection)."""
    from .pipeline import quality_failure
    why = quality_failure(min_recovery, evaluation)
    if why:
        print(f"quantfarm: failed quality: {why}; the artifact is kept for inspection", file=sys.stderr)
    return 3 if why else 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="evaluate an artifact against its fp16 source and write its report files", formatter_class=HelpWithDefaults)
    p.add_argument("artifact", help="an artifact folder written by quantfarm")
    _eval_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--min-recovery", type=float, help="exit 3 when recovery is below this")
    p.add_argument("--no-baseline-cache", action="store_true", help="recompute the fp16 baseline, store nothing")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="print an artifact's recovery table", formatter_class=HelpWithDefaults)
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the evaluation section of report.json")
    p.set_defaults(func=cmd_report)


def cmd_eval(a) -> int:
    from evaluation.suite import Evaluation

    from . import pipeline
    ev = Evaluation(**evaluation_from_args(a))
    result = pipeline.evaluate_artifact(a.artifact, ev, device=a.device, cache_dir=baseline_cache(a),
                                        on_step=lambda s: print(f"[quantfarm] {s}", file=sys.stderr, flush=True))
    print(report_text(result))
    return gate_exit(a.min_recovery, result)


def cmd_report(a) -> int:
    import json

    from evaluation import report
    from .errors import ArtifactError
    if not Path(a.artifact).is_dir():
        raise ArtifactError(f"no such artifact: {a.artifact} is not a folder")
    ev = report.read(a.artifact).get("evaluation")
    if not ev or not ev.get("rows"):
        raise ArtifactError(f"{a.artifact} has no evaluation in report.json; run `quantfarm eval {a.artifact}` first")
    print(json.dumps(ev, indent=2) if a.json else report_text(ev))
    return 0


def _inspect_parser(sub):
    p = sub.add_parser("inspect", help="describe an artifact: format, settings, sizes, compatibility, report", formatter_class=HelpWithDefaults)
    p.add_argument("artifact", help="an artifact folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a) -> int:
    import json

    from .inspect import describe, render
    d = describe(a.artifact)
    print(json.dumps(d, indent=2) if a.json else render(d))
    return 0


# Loggers of libraries that warn about things that do not concern a quantfarm user: torchao (pulled
# in by gptqmodel) about CUDA kernels it cannot load on a CPU machine, torch's pytree about an enum
# registration deprecated in torchao, alembic's INFO lines on every migration check.
QUIET = {"torchao": logging.ERROR, "torch.utils._pytree": logging.ERROR, "alembic": logging.WARNING}


def quiet_third_party():
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)


def main(argv=None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(prog="quantfarm", description="Quantize models into standard GPTQ, AWQ and compressed-tensors checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _inspect_parser(sub)
    _eval_parser(sub)
    from . import client, server
    server.add_parsers(sub)
    client.add_parsers(sub, _spec_arguments, spec_from_args)
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except QuantfarmError as e:
        print(f"quantfarm: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        print(f"quantfarm: error: invalid settings: {msgs}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
