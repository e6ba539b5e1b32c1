"""The `quantfarm` command line."""
import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from core.errors import QuantfarmError

from .args import (HelpWithDefaults, baseline_cache, eval_arguments, evaluation_from_args, size_for_device,
                   spec_arguments, spec_from_args)
from .progress import ProgressPrinter


def _quantize_parser(sub):
    p = sub.add_parser("quantize", help="quantize a model into a standard checkpoint folder", formatter_class=HelpWithDefaults)
    spec_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--state-dir", help="per-layer resume state: a rerun with the same folder resumes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-baseline-cache", action="store_true", help="recompute the fp16 baseline, store nothing")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a) -> int:
    from service.job import pipeline
    from service.job.context import JobContext, pick_device
    from service.job.spec import local_targets

    sizing = size_for_device(a, pick_device(a.device))
    spec = spec_from_args(a)
    local_targets(spec.publish)                       # an unknown target fails now, not after the work
    progress = ProgressPrinter()
    try:
        r = pipeline.run(spec, JobContext(a.out, device=a.device, state_dir=a.state_dir, overwrite=a.overwrite,
                                          cache_dir=baseline_cache(a), on_step=progress.on_step,
                                          on_layer=progress.on_layer))
    except KeyboardInterrupt:
        progress.close()
        done = progress.layers_done
        hint = (f"rerun the same command to resume from the {done} finished layers in {a.state_dir}" if a.state_dir
                else "nothing was kept; with --state-dir DIR finished layers are saved and a rerun resumes")
        print(f"\nquantfarm: interrupted; {hint}", file=sys.stderr)
        return 130
    progress.close()
    mb = 2 ** 20
    print(f"\nartifact     {r.artifact}")
    print(f"model        {r.model} @ {r.revision}")
    from quantizers import formats
    print(f"format       {formats.get(spec.format).summary_line(r.settings)}")
    if r.calibration_source:
        c = spec.calibration
        print(f"calibration  {c.samples} x {c.seq_len} tokens ({r.calibration_source})")
    if sizing:
        print(f"note         {sizing}")
    print(f"time         {r.seconds['total']:.1f} s total, {r.seconds['quantize']:.1f} s quantizing"
          + (f", {r.seconds['imatrix']:.1f} s importance matrix" if "imatrix" in r.seconds else ""))
    print(f"size         {r.size_before_bytes / mb:.1f} MiB (16-bit) -> {r.size_after_bytes / mb:.1f} MiB")
    from service.job.preflight import coverage_line, runtime_line, runtime_notes
    for v in r.preflight["runtimes"]:
        print(f"{v['runtime']:<13}{runtime_line(v)}")
    for v in r.preflight["runtimes"]:
        for n in runtime_notes(v):
            print(f"note         {v['runtime']}: {n}")
    c = r.coverage
    if c:
        extra = (f" ({len(c['kept'])} kept 16-bit on purpose)" if c.get("kept") else
                 f" (types: {', '.join(f'{k} {n}' for k, n in c['types'].items())})" if c.get("types") else "")
        print("coverage     " + coverage_line(c["fraction"], extra))
    if r.llama_cpp:
        q, f = r.llama_cpp["quantized"], r.llama_cpp["fp16"]
        print(f"llama.cpp    perplexity {q['perplexity']:.4f} (F16 {f['perplexity']:.4f}), KLD {q['kld']:.5f}, "
              f"same top token {100 * q['same_top_p']:.1f}%")
    if r.serving:
        print("serving      " + serving_line(r.serving))
    if r.evaluation:
        print()
        print(report_text(r.evaluation))
    return gate_exit(spec.min_recovery, r.evaluation) or publish_exit(r.artifact, spec)


def publish_exit(folder, spec, replace: bool = False) -> int:
    """Publish a finished artifact to the spec's targets; 4 when one fails (the artifact stays here)."""
    from service.job.spec import local_targets
    from service.job.publish import publish_each
    targets = local_targets(spec.publish)
    records, pending, why = publish_each(folder, spec, targets, replace=replace)
    notes = {"unchanged": " (already there, the same files: nothing copied)", "replaced": " (replaced what was there)"}
    for rec in records:
        print(f"published    {rec['entry']}: {rec['url']}" + (f" (commit {rec['commit']})" if rec.get("commit") else "")
              + notes.get(rec.get("status"), ""))
    if why:
        again = " ".join(f"--to {e}" for e in pending)
        print(f"quantfarm: {why}\nthe artifact is kept at {folder}; publish it with `quantfarm publish {folder} {again}`",
              file=sys.stderr)
        return 4
    return 0


def _merge_parser(sub):
    p = sub.add_parser("merge", help="merge the models of a mergekit recipe into a folder, without quantizing",
                       formatter_class=HelpWithDefaults)
    p.add_argument("recipe", help="a mergekit YAML recipe; its models: Hub ids (org/name[@revision]), local folders")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights in the sources")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the sources' own Python code to run")
    p.set_defaults(func=cmd_merge)


def cmd_merge(a) -> int:
    from service.job import merge, merge_recipe
    from service.job.sources import Access
    m = merge.pin(merge_recipe.load_recipe(a.recipe), Access(a.allow_pickle, a.trust_remote_code))
    cached = m.built
    out = merge.export(m, a.out, overwrite=a.overwrite, on_step=ProgressPrinter().on_step)
    print(f"\nmerged       {out}{' (from the cache)' if cached else ''}")
    print(f"method       {m.method} (mergekit {merge_recipe.mergekit_version()}, seed {merge.SEED})")
    for p, src in m.sources.items():
        print(f"source       {p} @ {src.revision or src.content_hash}")
    print(f"merge key    {m.key}")
    return 0


def _publish_parser(sub):
    p = sub.add_parser("publish", help="publish a finished artifact (again) without quantizing", formatter_class=HelpWithDefaults)
    p.add_argument("artifact", help="an artifact folder written by quantfarm")
    p.add_argument("--to", action="append", required=True, metavar="TARGET",
                   help="hub[:ORG] or a URL (file:///abs/path, s3://bucket/prefix, gs://...); repeatable")
    p.add_argument("--name", help="the published name (default: the job's, e.g. gptq-w4-g128)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite a folder at TARGET/MODEL-REV/NAME that holds another artifact (refused without it)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(a) -> int:
    from core.errors import ArtifactError
    from evaluation import report
    from service.job.spec import JobSpec
    spec = (report.read(a.artifact) or {}).get("spec")
    if not spec:
        raise ArtifactError(f"{a.artifact} has no report.json with its job's settings; only artifacts quantfarm "
                            "wrote can be published")
    return publish_exit(a.artifact, JobSpec.model_validate({**spec, "publish": a.to, **({"name": a.name} if a.name else {})}),
                        replace=a.replace)


def serving_line(part: dict) -> str:
    if "error" in part:
        return f"not measured: {part['error']}"
    q, sp = part["models"]["quantized"], part["speedup"]
    if not sp:
        errs = "; ".join(f"{k}: {m['error']}" for k, m in part["models"].items() if "error" in m)
        return f"vLLM {part['vllm']} refused: {errs}"
    return (f"vLLM {part['vllm']} on {'CPU' if part['cpu'] else 'GPU'}: decode {q['decode_tok_s']['1']:.1f} tok/s "
            f"({sp['decode_1']:.2f}x fp16), prefill {q['prefill_tok_s']['1']:.0f} tok/s ({sp['prefill_1']:.2f}x), "
            f"weights {sp['weight_memory']:.2f}x smaller; `{part['serve_command']}`")


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
    from service.job.pipeline import quality_failure
    why = quality_failure(min_recovery, evaluation)
    if why:
        print(f"quantfarm: failed quality: {why}; the artifact is kept for inspection", file=sys.stderr)
    return 3 if why else 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="evaluate an artifact against its fp16 source and write its report files", formatter_class=HelpWithDefaults)
    p.add_argument("artifact", help="an artifact folder written by quantfarm")
    eval_arguments(p)
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

    from service.job.reevaluate import evaluate_artifact
    ev = Evaluation(**evaluation_from_args(a))
    result = evaluate_artifact(a.artifact, ev, device=a.device, cache_dir=baseline_cache(a),
                               on_step=lambda s: print(f"[quantfarm] {s}", file=sys.stderr, flush=True))
    print(report_text(result))
    return gate_exit(a.min_recovery, result)


def cmd_report(a) -> int:
    import json

    from core.errors import ArtifactError
    from evaluation import report
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

    from service.job.inspection import describe, render
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
    _merge_parser(sub)
    _inspect_parser(sub)
    _eval_parser(sub)
    _publish_parser(sub)
    from . import client, farm, release
    farm.add_parsers(sub)
    release.add_parsers(sub)
    client.add_parsers(sub, spec_arguments, spec_from_args)
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
