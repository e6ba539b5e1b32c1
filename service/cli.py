"""The `quantfarm` command line."""
import argparse
import sys

from pydantic import ValidationError

from .errors import QuantfarmError


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
    p.add_argument("--calibration", default="auto",
                   help="auto | c4 | wikitext2 | model | FILE.txt | FILE.jsonl | hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-text", help="held-out text for perplexity (default: WikiText-2 validation when present)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def spec_from_args(a, **extra):
    from .spec import JobSpec
    return JobSpec(model=a.model, revision=a.revision, algorithm=a.algorithm, format=a.format, bits=a.bits,
                   group_size=a.group_size, sym=a.sym, desc_act=a.act_order != "none",
                   static_groups=a.act_order == "static",
                   true_sequential=a.true_sequential, damp_percent=a.damp,
                   calibration={"source": a.calibration, "samples": a.samples, "seq_len": a.seq_len, "seed": a.seed},
                   evaluation={"suite": "none" if a.no_eval else "perplexity", "text": a.eval_text,
                               "windows": a.eval_windows, "limit": getattr(a, "eval_limit", None)},
                   allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code, **extra)


def _quantize_parser(sub):
    p = sub.add_parser("quantize", help="quantize a model into a standard checkpoint folder")
    _spec_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--state-dir", help="per-layer checkpoints: a rerun with the same folder resumes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a) -> int:
    from tqdm import tqdm

    from . import pipeline

    spec = spec_from_args(a)
    bar = None

    def on_step(step):
        print(f"[quantfarm] {step}", file=sys.stderr, flush=True)

    def on_layer(rep, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=rep.index, desc="layers", unit="layer", file=sys.stderr)
        worst = max((m.get("rel_error", 0.0) for m in rep.modules.values()), default=0.0)
        bar.set_postfix_str(f"{rep.seconds:.1f}s, worst rel err {worst:.2e}")
        bar.update(1)

    r = pipeline.run(spec, a.out, device=a.device, state_dir=a.state_dir, overwrite=a.overwrite,
                     on_step=on_step, on_layer=on_layer)
    if bar is not None:
        bar.close()
    mb = 2 ** 20
    print(f"\nartifact     {r.artifact}")
    print(f"model        {r.model} @ {r.revision}")
    act = r.preflight["settings"]["act_order"]
    print(f"format       {spec.format} {spec.bits}-bit g{spec.group_size} {'sym' if spec.symmetric else 'asym'}"
          f"{' act-order ' + act if act != 'none' else ''} ({spec.algorithm})")
    print(f"time         {r.seconds['total']:.1f} s total, {r.seconds['quantize']:.1f} s quantizing")
    print(f"size         {r.size_before_bytes / mb:.1f} MiB (16-bit) -> {r.size_after_bytes / mb:.1f} MiB")
    if r.perplexity:
        p = r.perplexity
        print(f"perplexity   {p['fp16']:.3f} (fp16) -> {p['quantized']:.3f} (quantized), x{p['ratio']:.3f} "
              f"on {p['windows']} x {p['window_len']} tokens of {p['text']}")
    for v in r.preflight["runtimes"]:
        print(f"{v['runtime']:<13}{v['path'] if v['ok'] else 'not loadable'}")
    for w in r.warnings:
        print(f"note         {w}")
    return 0


def _inspect_parser(sub):
    p = sub.add_parser("inspect", help="describe an artifact: format, settings, sizes, compatibility, report")
    p.add_argument("artifact", help="an artifact folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a) -> int:
    import json

    from .inspect import describe, render
    d = describe(a.artifact)
    print(json.dumps(d, indent=2) if a.json else render(d))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quantfarm", description="Quantize models into standard GPTQ, AWQ and compressed-tensors checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _inspect_parser(sub)
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
