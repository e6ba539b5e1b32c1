"""Arguments shared by the commands: the JobSpec settings (`quantize` runs a job here, `submit` on the
farm), the evaluation settings, and --help that shows defaults."""
import argparse


class TableNames:
    """The names in the algorithm, format or scheme table, looked up when argparse first needs them: building the
    parser imports no torch, so the client commands start at once."""

    def __init__(self, table: str):
        self.table = table

    def _names(self) -> list[str]:
        if self.table == "formats":
            from quantizers.formats import FORMATS as table
        elif self.table == "schemes":
            from quantizers.schemes import SCHEMES as table
        else:
            from quantizers.algorithms import ALGORITHMS as table
        return list(table)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless it is unset (None/False) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)" if text else "default: %(default)s"
        return text


def spec_arguments(p):
    """The JobSpec settings, shared by `quantize` (runs here) and `submit` (runs on the farm)."""
    model_arguments(p)
    weight_arguments(p)
    data_arguments(p)


def model_arguments(p):
    p.add_argument("model", help="smollm2-135m (built-in demo), a Hugging Face id org/name, a local folder, a .gguf file, "
                                 "or a mergekit recipe (.yaml: its models are merged, then quantized)")
    p.add_argument("--revision", help="Hub branch, tag or commit (pinned to a commit sha)")


def weight_arguments(p):
    """What a variant of a release may set: how the weights are quantized and stored."""
    p.add_argument("--algorithm", choices=TableNames("algorithms"),
                   help="how weights are quantized (default gptq; rtn for a scheme with FP8 weights)")
    p.add_argument("--format", choices=TableNames("formats"),
                   help="how they are stored (default gptq, compressed-tensors with --scheme; awq: 4-bit AWQ GEMM; "
                        "compressed-tensors: vLLM-native; gguf: llama.cpp's converter and llama-quantize, with "
                        "--gguf-type)")
    p.add_argument("--scheme", choices=TableNames("schemes"),
                   help="a named scheme, as llm-compressor names its presets: W4A16, W8A8 (int8 weights and "
                        "activations), FP8_DYNAMIC, ...; it sets --bits/--group-size/--sym")
    p.add_argument("--gguf-type", metavar="TYPE", help="format gguf: the llama-quantize type (Q2_K, Q3_K_M, Q4_K_M, "
                   "Q5_K_M, Q6_K, Q8_0, IQ4_XS, ...; default Q4_K_M)")
    p.add_argument("--imatrix", choices=["quantfarm", "llama", "none"],
                   help="format gguf: the importance matrix: quantfarm (default; from the calibration forward), "
                        "llama (llama.cpp's llama-imatrix on the calibration text) or none")
    p.add_argument("--gguf-shard", metavar="SIZE", help="format gguf: split into files of at most SIZE (e.g. 48G)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], help="(default: 4)")
    p.add_argument("--group-size", type=int, help="columns per group; -1 for one group per row (default: 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid (default for gptq and rtn)")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric grid (always for awq; GPTQ writes it as gptq_v2)")
    p.add_argument("--act-order", choices=["static", "dynamic", "none"],
                   help="GPTQ's column order by descending Hessian diagonal: static (gptq's default; groups keep "
                        "their natural columns, so g_idx stays monotonic and inference pays nothing), dynamic "
                        "(groups formed in that order: classic desc_act, non-monotonic g_idx), or none")
    p.add_argument("--desc-act", dest="act_order", action="store_const", const="dynamic",
                   help="same as --act-order dynamic")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="collect all inputs of a layer at once instead of group by group")
    p.add_argument("--damp", type=float, default=0.01, help="damping as a fraction of mean(diag H)")
    p.add_argument("--set", dest="knobs", action="append", default=[], metavar="KNOB=VALUE",
                   help="one of the algorithm's own settings, named as the API's JobSpec field (e.g. awq_grid=40; "
                        "a name it does not know lists them); repeatable")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="leave these decoder modules in 16 bits on purpose (fnmatch on full names, e.g. "
                        "'*.shared_expert.*'); repeatable. Without it a job fails if under 99%% of the "
                        "decoder layers' weight matrices can be quantized")


def data_arguments(p):
    """What every variant of a release shares: calibration, evaluation, the gate, trust."""
    p.add_argument("--calibration", default="auto",
                   help="auto | c4 | wikitext2 | model | FILE.txt | FILE.jsonl | hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration samples (default {GPU_SIZING['samples']}; `quantize` on a CPU: "
                        f"{CPU_SIZING['samples']})")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0)
    eval_arguments(p)
    p.add_argument("--no-eval", dest="suite", action="store_const", const="none", help="same as --suite none")
    p.add_argument("--min-recovery", type=float,
                   help="quality gate: recovery below this fails the job (failed_quality; the artifact is kept)")
    p.add_argument("--publish", action="append", metavar="TARGET",
                   help="where a succeeded artifact also goes: hub[:ORG] (HF_TOKEN; QUANTFARM_HUB_ORG), or a URL "
                        "(file:///abs/path, s3://bucket/prefix, gs://...); repeatable. On a server: local, hub or a "
                        "target its administrator named")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def eval_arguments(p):
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
    p.add_argument("--serving", action="store_true",
                   help="also serve the artifact and the fp16 model in vLLM (QUANTFARM_VLLM_PYTHON) on this device: "
                        "weight memory, time to first token, prefill and decode tokens/s, the serve command")


def _given(**kw) -> dict:
    """The options the user set: unset ones (None) take the JobSpec's defaults."""
    return {k: v for k, v in kw.items() if v is not None}


def evaluation_from_args(a) -> dict:
    suite = a.suite.split(",") if "," in a.suite else a.suite
    return {"suite": suite, "text": a.eval_text, "limit": a.eval_limit, "batch_size": a.eval_batch_size,
            "data_dir": a.data_dir, "serving": a.serving, **_given(windows=a.eval_windows)}


def model_source(ref: str, revision: str | None) -> dict:
    """{model, revision}, or for a merge recipe file (.yaml/.yml) {model: its name, merge: the recipe}: the recipe
    travels inside the spec, so a server never reads the submitter's files."""
    from service.job import merge_recipe
    if not merge_recipe.is_recipe_path(ref):
        return {"model": ref, "revision": revision}
    if revision:
        from core.errors import SpecError
        raise SpecError("--revision: a merge recipe pins its own sources (name them org/name@revision in it)")
    from pathlib import Path
    return {"model": Path(ref).stem, "merge": merge_recipe.load_recipe(ref)}


def shared_from_args(a) -> dict:
    """The settings `data_arguments` read, as JobSpec/ReleaseSpec fields."""
    return dict(**model_source(a.model, a.revision),
                calibration={"source": a.calibration, "seq_len": a.seq_len, "seed": a.seed, **_given(samples=a.samples)},
                evaluation=evaluation_from_args(a), min_recovery=a.min_recovery,
                allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code,
                **({"publish": a.publish} if a.publish else {}))


def knobs_from_args(pairs: list[str]) -> dict:
    """--set KNOB=VALUE as JobSpec fields: only knobs an algorithm of the table declares (JobSpec parses the
    values and refuses a knob of another algorithm)."""
    from core.errors import SpecError
    from service.job.spec import KNOBS
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or KNOBS.get(name.strip(), ("",))[0] != "algorithm":
            known = ", ".join(k for k, (kind, _, _) in KNOBS.items() if kind == "algorithm")
            raise SpecError(f"--set {pair!r}: give KNOB=VALUE with one of the algorithms' knobs ({known})")
        out[name.strip()] = value.strip()
    return out


def spec_from_args(a, **extra):
    from service.job.spec import JobSpec
    return JobSpec(sym=a.sym, act_order=a.act_order, true_sequential=a.true_sequential, damp_percent=a.damp, keep=a.keep,
                   **_given(algorithm=a.algorithm, format=a.format, scheme=a.scheme, bits=a.bits,
                            group_size=a.group_size, gguf_type=a.gguf_type, imatrix=a.imatrix, gguf_shard=a.gguf_shard),
                   **knobs_from_args(a.knobs), **shared_from_args(a), **extra)


# Calibration samples and evaluation windows (of 512 tokens) when the user sets neither: the JobSpec's
# defaults on a GPU; `quantize` on a CPU takes a quarter of the calibration and half the windows, so a
# first run of the demo model ends in about two minutes on two cores (BENCHMARKS.md, "Set-up and demo").
GPU_SIZING = {"samples": 128, "windows": 32}
CPU_SIZING = {"samples": 32, "windows": 16}


def baseline_cache(a):
    """Where runs in this process cache fp16 baselines: HOME/baselines (QUANTFARM_HOME, default ~/.quantfarm), as
    a farm's workers on this machine do; None with --no-baseline-cache."""
    from service.farm.home import default_home
    return None if a.no_baseline_cache else default_home() / "baselines"


def size_for_device(a, device) -> str | None:
    """Fill unset --samples/--eval-windows for a CPU run; returns the sentence the summary prints."""
    if device.type != "cpu" or (a.samples is not None and a.eval_windows is not None):
        return None
    a.samples = CPU_SIZING["samples"] if a.samples is None else a.samples
    a.eval_windows = CPU_SIZING["windows"] if a.eval_windows is None else a.eval_windows
    return (f"sized for a CPU: {a.samples} x {a.seq_len} calibration tokens, {a.eval_windows} x 512 evaluation "
            f"tokens (GPU defaults {GPU_SIZING['samples']} and {GPU_SIZING['windows']}; set --samples and "
            "--eval-windows to choose)")


