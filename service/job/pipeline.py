"""One quantization job, step by step: resolve -> load -> calibrate -> quantize -> save -> evaluate.

The CLI's `quantize` and (later) the job workers both call `run`; the steps report progress
through callbacks so each front end shows it its own way.
"""
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from calibration import build_calibration, eval_tokens
from calibration.data import resolve_calibration_source, resolve_eval_source
from evaluation import report, serving, suite
from core.errors import ArtifactError, ModelSourceError, SpecError
from core.version import quantfarm_version
from quantizers import artifact, estimates, moe
from quantizers.algorithms import algorithm
from quantizers.config import QuantConfig
from quantizers.layers import mark_kept
from quantizers.walk import LayerReport, check_coverage, coverage, quantize_model

from . import merge, preflight, storage
from .merge import resolve_source
from .models import fp16_folder, load_model, resolve_model, source_card
from .shared import Shared
from .spec import JobSpec


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def compute_dtype(dev: torch.device) -> torch.dtype:
    """float32 on CPU (bfloat16 matmuls there are slow and lossy), bfloat16 on accelerators."""
    return torch.float32 if dev.type == "cpu" else torch.bfloat16


@dataclass
class Result:
    artifact: str
    model: str
    revision: str | None
    recipe_key: str
    calibration_hash: str
    calibration_source: str | None = None
    seconds: dict = field(default_factory=dict)
    size_before_bytes: int = 0
    size_after_bytes: int = 0
    perplexity: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    preflight: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)          # what was used (the spec resolved), not what was asked
    bits_per_weight: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    reused: dict = field(default_factory=dict)            # work taken from a release's Shared, by kind
    serving: dict | None = None                          # vLLM serving numbers, artifact against fp16
    llama_cpp: dict | None = None                        # GGUF: llama.cpp's perplexity and KLD against its F16
    merge: dict | None = None                            # a merge recipe's source: recipe, sources, their fp16 scores

    @property
    def recovery(self) -> float | None:
        return self.evaluation.get("recovery")


def _noop(*_a, **_k):
    pass


def round_to_storage(model) -> torch.dtype:
    """Round float weights to the 16-bit storage dtype in place (keeping the compute dtype): the fp16
    baseline is then the model as a 16-bit checkpoint holds it, and the quantizer starts from it."""
    dtype = artifact.storage_dtype(model)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype).to(p.dtype)
    return dtype


def target(cfg: QuantConfig, fmt: str, model=None) -> preflight.Target:
    is_moe = model is not None and moe.has_experts(n for n, _ in model.named_modules())
    return preflight.Target(fmt, cfg.algorithm, cfg.scheme, is_moe)


def bits_per_weight(folder: Path, quantized_names: set[str], q_params: int, n_params: int) -> dict:
    """Storage per weight, from the files: of the quantized Linears (codes, scales, zeros, g_idx; the
    names as written) and of the whole model (embeddings, head and norms stay 16-bit)."""
    nbytes = artifact.tensor_nbytes(folder)
    q_bytes = sum(b for k, b in nbytes.items() if k.rsplit(".", 1)[0] in quantized_names)
    return {"quantized_linears": round(8 * q_bytes / max(q_params, 1), 3),
            "overall": round(8 * sum(nbytes.values()) / max(n_params, 1), 3)}


def artifact_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def perplexity_summary(evaluation: dict) -> dict:
    """The perplexity row in the short form the CLI, `inspect` and job results print."""
    row = next((r for r in evaluation.get("rows", []) if r["name"] == "perplexity"), None)
    if row is None:
        return {}
    s = suite.Evaluation.model_validate(evaluation["settings"])
    return {"text": evaluation["text"], "windows": s.n_windows, "window_len": s.window_len, "fp16": row["fp16"],
            "quantized": row["quantized"], "ratio": row["quantized"] / row["fp16"]}


def quality_failure(min_recovery: float | None, evaluation: dict) -> str | None:
    """Why a result fails its quality gate, or None when it passes or has no gate."""
    if min_recovery is None:
        return None
    recovery = evaluation.get("recovery")
    if recovery is None:
        return "min_recovery is set but the evaluation suite gives no recovery to check it against"
    if recovery < min_recovery:
        return f"recovery {recovery:.4f} ({evaluation['recovery_basis']}) is below min_recovery {min_recovery}"
    return None


def run(spec: JobSpec, out_dir, *, device: str = "auto", state_dir=None, overwrite: bool = False, cache_dir=None,
        on_step: Callable[[str], None] = _noop, on_layer: Callable[[LayerReport, int], None] = _noop,
        should_stop: Callable[[], bool] | None = None, model_roots: list | None = None,
        shared: Shared | None = None) -> Result:
    """Run the whole job and return its summary; the artifact lands in `out_dir` with its report files.
    fp16 baselines are cached under `cache_dir` (None: not cached); `model_roots` (farm workers) confines
    local models to those folders; jobs given one `shared` (a release's variants) do the work that does
    not depend on the weight settings once."""
    shared = shared or Shared()
    reused_before = Counter(shared.reused)
    times = {}
    t0 = time.perf_counter()
    dev = pick_device(device)
    storage.check_replaceable(out_dir, overwrite)
    storage.check_writable(out_dir)                                     # before anything is loaded

    if spec.format == "gguf":                                           # made by llama.cpp's tools
        from . import gguf_job
        return gguf_job.run(spec, out_dir, dev=dev, overwrite=overwrite, cache_dir=cache_dir, on_step=on_step,
                            should_stop=should_stop, model_roots=model_roots, shared=shared)

    on_step("resolve")
    src, revision = resolve_pinned(spec, shared, model_roots, on_step, should_stop,
                                   before_weights=lambda s: check_before_weights(spec, s, out_dir))
    dtype = compute_dtype(dev)
    model, tokenizer = load_model(src, dtype=dtype)
    round_to_storage(model)
    moe.unfuse_experts(model)                                           # experts as per-expert Linears
    cfg = artifact.with_scale_dtype(spec.quant_config(), spec.format, model)
    mark_kept(model, cfg.keep)
    cover = coverage(model, cfg.keep)
    check_coverage(cover)                                               # no silent 16-bit weights
    shapes = preflight.model_shapes(model)
    checks = preflight.report(target(cfg, spec.format, model), shapes)
    preflight.refuse_unwritable(checks)                                 # before any quantization work
    storage.check_space(out_dir, estimates.artifact_bytes(model, cfg.scheme))
    notes = [f"{v['runtime']}: {n}" for v in checks["runtimes"] for n in v["notes"]]
    size_before = sum(p.numel() for p in model.parameters()) * 2
    times["load"] = time.perf_counter() - t0

    plan, base = fp16_baseline(spec, lambda: model, tokenizer, revision, dtype, dev, shared, cache_dir, on_step, times)

    calib = calibrate(spec, lambda: model, tokenizer, revision, dtype, shared, on_step, times) \
        if algorithm(cfg.algorithm).NEEDS_DATA else None

    on_step("quantize")
    t = time.perf_counter()
    recipe = spec.recipe(revision)
    if calib is not None:
        recipe["calibration_hash"] = calib.content_hash
    quantized, reports = quantize_model(model, calib.tokens if calib is not None else None, cfg, dev,
                                        state_dir=state_dir, recipe=recipe, on_layer=on_layer,
                                        should_stop=should_stop)
    times["quantize"] = time.perf_counter() - t
    cover["experts"] = moe.summary(reports)

    on_step("save")
    t = time.perf_counter()
    key = spec.recipe_key(revision)
    meta = {"quantizer": [f"quantfarm:{quantfarm_version()}"], "recipe_hash": key,
            "calibration_hash": calib.content_hash if calib is not None else None,
            "calibration": calib.source if calib is not None else None,
            "source_model": spec.model, "source_revision": revision, "algorithm": cfg.algorithm}
    out = artifact.save(out_dir, model, tokenizer, quantized, cfg, spec.format, meta, overwrite=overwrite)
    times["save"] = time.perf_counter() - t
    rename = moe.checkpoint_renamer(model) or (lambda n: n)
    bpw = bits_per_weight(out, {rename(n) for n in quantized}, sum(qw.codes.numel() for qw in quantized.values()),
                          size_before // 2)
    model = None                                                        # freed before the evaluation
    merged = merge_part(src, plan, dtype, dev, shared, cache_dir, on_step, times)

    evaluation = {}
    if plan is not None:
        on_step("evaluate artifact")
        t = time.perf_counter()
        qmodel, qtok, _ = artifact.load_artifact(out, dtype=dtype)
        evaluation = suite.compare(plan, base, plan.quantized(qmodel.to(dev), qtok))
        times["evaluate_quantized"] = time.perf_counter() - t
        del qmodel
    serving_part = None
    if spec.evaluation.serving:
        on_step("measure serving")
        t = time.perf_counter()
        serving_part = measure_serving(out, src, dev, shared)
        times["serving"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    used = {**checks["settings"], "scale_dtype": cfg.scheme.scale_dtype, "damp_percent": cfg.damp_percent,
            "true_sequential": cfg.true_sequential, "keep": list(cfg.keep), "revision": revision,
            "ragged_groups": bool(cfg.scheme.ragged_widths(shapes)),
            "calibration": None if calib is None else {"source": calib.source, "samples": spec.calibration.samples,
                                                       "seq_len": spec.calibration.seq_len,
                                                       "seed": spec.calibration.seed, "hash": calib.content_hash}}
    result = Result(artifact=str(out), model=spec.model, revision=revision, recipe_key=key,
                    calibration_hash=meta["calibration_hash"], calibration_source=meta["calibration"],
                    seconds=times, size_before_bytes=size_before, size_after_bytes=artifact_bytes(out),
                    perplexity=perplexity_summary(evaluation),
                    layers=[{"index": r.index, "seconds": r.seconds, "modules": r.modules} for r in reports],
                    warnings=notes, preflight=checks, coverage=cover, settings=used,
                    bits_per_weight=bpw, evaluation=evaluation, reused=dict(shared.reused - reused_before),
                    serving=serving_part, merge=merged)
    report.write(out, {"quantfarm": quantfarm_version(), "spec": spec.model_dump(), "source_card": source_card(src),
                       **asdict(result)})
    return result


def resolve_key(spec, model_roots) -> tuple:
    """What a resolved source is remembered under in a Shared (a release's variants find it there)."""
    return (spec.model, spec.revision, spec.allow_pickle, spec.trust_remote_code, tuple(map(str, model_roots or ())),
            json.dumps(spec.merge, sort_keys=True))


def resolve_pinned(spec: JobSpec, shared: Shared, model_roots, on_step=_noop, should_stop=None,
                   before_weights=None) -> tuple:
    """(the resolved source, its pinned revision), refusing a local source (or a merge) whose content changed
    since the job was made (its revision is then a content hash). The source is pinned from its config and
    index files first; `before_weights(src)` makes the checks those answer, and only then are a Hub model's
    weights fetched (with progress steps) and a merge recipe merged (both cached)."""
    key = resolve_key(spec, model_roots)
    src = shared.get("resolve", key, lambda: resolve_source(spec, local_roots=model_roots, build_merge=False,
                                                            weights=False))
    revision = src.revision or src.content_hash
    if src.revision is None and spec.revision and spec.revision != src.content_hash:
        what = "its merge recipe's sources" if spec.merge is not None else "its files"
        raise ModelSourceError(f"{spec.model} was pinned at content hash {spec.revision[:16]}... when the job was "
                               f"made, and {what} now hash to {src.content_hash[:16]}...: the model changed since; "
                               "submit it again to quantize what is there now")
    if merge.incomplete(src):
        if before_weights is not None:
            before_weights(src)
        src = merge.complete(src, on_step=on_step, should_stop=should_stop)
        shared.put("resolve", key, src)
    return src, revision


def check_before_weights(spec: JobSpec, src, out_dir) -> None:
    """What a source's config answers, checked before its weights are fetched: the format can hold these
    settings for its Linear shapes, and the artifact fits where it goes (both checked again on the loaded
    model). A config that cannot be read here leaves it to those later checks."""
    from .facts import model_facts
    facts = model_facts(src)
    if facts is None:
        return
    cfg = spec.quant_config()
    preflight.refuse_unwritable(preflight.report(target(cfg, spec.format), set(facts.shapes)))
    storage.check_space(out_dir, estimates.artifact_bytes(facts.meta_model, cfg.scheme))


def merge_part(src, plan, dtype, dev, shared: Shared, cache_dir, on_step, times: dict) -> dict | None:
    """A merged source's part of the report: the recipe, each source at its revision and, with an evaluation,
    each source's fp16 scores (cached like any baseline) beside the merged model's; None for other sources."""
    if src.merge is None:
        return None
    part = merge.provenance(src.merge)
    if plan is not None:
        on_step("evaluate merge sources")
        t = time.perf_counter()

        def load(s):
            m, tok = load_model(s, dtype=dtype)
            round_to_storage(m)
            return m.to(dev), tok
        scores = merge.source_scores(src.merge, plan, shared.baseline_cache(cache_dir), load, dtype, dev)
        for row in part["sources"]:
            row.update(scores[row["model"]])
        times["evaluate_sources"] = time.perf_counter() - t
    return part


def calibrate(spec: JobSpec, get_model, tokenizer, revision: str, dtype, shared: Shared, on_step, times: dict):
    """The calibration set, built once per setting in a Shared (`get_model()`: the fp16 model, asked for only
    when the calibration text is sampled from it)."""
    on_step("calibrate")
    t = time.perf_counter()
    c = spec.calibration
    model = get_model() if resolve_calibration_source(c.source) == "model" else None
    calib = shared.get("calibration", (revision, str(dtype), *c.model_dump().values()),
                       lambda: build_calibration(c.source, tokenizer, n_samples=c.samples, seq_len=c.seq_len,
                                                 seed=c.seed, model=model))
    times["calibrate"] = time.perf_counter() - t
    return calib


def fp16_baseline(spec: JobSpec, get_model, tokenizer, revision: str, dtype, dev, shared: Shared, cache_dir,
                  on_step, times: dict) -> tuple:
    """(the evaluation plan, the fp16 model's results), both None without an evaluation suite. `get_model()`
    gives the fp16 model, asked for only on a baseline cache miss or for model-sampled text; it goes back to
    the CPU after (the walk streams layers to the device itself)."""
    if not spec.evaluation.parts:
        return None, None
    on_step("evaluate fp16")
    t = time.perf_counter()
    text = (revision, spec.evaluation.text, str(dtype))
    sampled = resolve_eval_source(spec.evaluation.text) == "model"
    plan = suite.EvaluationPlan(spec.evaluation, spec.model, revision, dtype, dev, text_tokens=lambda: shared.get(
        "eval_text", text, lambda: eval_tokens(spec.evaluation.text, tokenizer,
                                               model=get_model() if sampled else None)))
    on_device = []

    def load_fp16():                                    # only on a baseline cache miss
        on_device.append(get_model().to(dev))
        return on_device[0], tokenizer
    base = plan.baseline(shared.baseline_cache(cache_dir), load_fp16)
    for model in on_device:
        model.to("cpu")
    times["evaluate_fp16"] = time.perf_counter() - t
    return plan, base


def measure_serving(folder, src, dev: torch.device, shared: Shared) -> dict:
    """The report's serving part; the fp16 model's numbers once per source and device (a release's variants
    share them). Where vLLM cannot run here the part says why instead of failing the job."""
    key = (src.content_hash, str(dev))
    try:
        fp16 = shared.peek("serving_fp16", key)
        part = serving.measure(folder, fp16_folder(src), str(dev), fp16_result=fp16)
        if fp16 is None and "error" not in part["models"]["fp16"]:
            shared.put("serving_fp16", key, part["models"]["fp16"])
        return part
    except serving.ServingUnavailable as e:
        return {"error": str(e)}


def evaluate_artifact(folder, ev: suite.Evaluation, *, device: str = "auto", cache_dir=None,
                      on_step: Callable[[str], None] = _noop) -> dict:
    """Evaluate a finished artifact against its fp16 source (named in its report.json, else in its
    quantization_config's meta) and rewrite its report files; returns the evaluation."""
    folder = Path(folder)
    rep = report.read(folder)
    spec = rep.get("spec") or {}
    if spec.get("format") == "gguf":
        from core.errors import NotImplementedFeature
        raise NotImplementedFeature(f"{folder} is a GGUF artifact: evaluating it again is not implemented; run its "
                                    "job again with the evaluation settings you want (the F16 file and importance "
                                    "matrix are cached, so only llama-quantize and the evaluation run)")
    model_id, revision = spec.get("model"), rep.get("revision")
    if not model_id:
        raise ArtifactError(f"{folder} has no report.json naming its source model; only artifacts written by "
                            "quantfarm can be evaluated against their fp16 source")
    dev = pick_device(device)
    dtype = compute_dtype(dev)
    on_step("resolve")
    if spec.get("merge") is not None:                  # merged again from the recipe unless cached
        src = resolve_source(JobSpec.model_validate(spec).model_copy(update={"revision": None}), on_step=on_step)
    else:
        src = resolve_model(model_id, revision if _is_commit(revision) else None,
                            allow_pickle=spec.get("allow_pickle", False),
                            trust_remote_code=spec.get("trust_remote_code", False))
    pinned = src.revision or src.content_hash
    if revision and pinned != revision:
        raise ArtifactError(f"{folder} was made from {model_id} @ {revision}, but that now resolves to {pinned}; "
                            "the fp16 baseline would be of a different model")
    fp16 = {}

    def load_fp16():
        if not fp16:
            on_step("load fp16")
            model, tok = load_model(src, dtype=dtype)
            round_to_storage(model)
            fp16["m"] = (model.to(dev), tok)
        return fp16["m"]

    def text_tokens():
        from transformers import AutoTokenizer
        sampled = resolve_eval_source(ev.text) == "model"
        return eval_tokens(ev.text, AutoTokenizer.from_pretrained(folder), model=load_fp16()[0] if sampled else None)

    def load_quantized():
        fp16.clear()                                   # the fp16 model is done with by now
        on_step("evaluate artifact")
        qmodel, qtok, _ = artifact.load_artifact(folder, dtype=dtype)
        return qmodel.to(dev), qtok

    on_step("evaluate")
    plan = suite.EvaluationPlan(ev, model_id, pinned, dtype, dev, text_tokens=text_tokens)
    evaluation = plan.run(suite.BaselineCache(cache_dir), load_fp16, load_quantized)
    rep.update(evaluation=evaluation, perplexity=perplexity_summary(evaluation))
    report.write(folder, rep)
    return evaluation


def _is_commit(revision: str | None) -> bool:
    return bool(revision) and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
