"""One quantization job, the same for the CLI, a farm worker and a release:
resolve -> facts -> preflight (before any weights load) -> make -> evaluate -> report.

The format's entry in the table (quantizers/formats) names its maker in MAKERS: the layer walk for the
packed formats (walk_job.py), llama.cpp's tools for GGUF (gguf_job.py). A maker answers
`preflight(ctx, spec, src, facts)` from the model's config, `make(job)` (the fp16 baseline and calibration
at the point it needs them), `evaluate(job, made)` and `finish(job, made)`; everything else is here.
Publishing is the front end's, after the quality gate (publish.py).
"""
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field

from core.errors import ModelSourceError
from core.version import quantfarm_version
from evaluation import report, suite
from quantizers import formats

from . import gguf_job, merge, storage, walk_job
from .context import Clock, JobContext
from .facts import model_facts
from .merge import resolve_source
from .loading import source_card
from .spec import JobSpec
from .steps import Job, measure_serving, merge_part

MAKERS = {"walk": walk_job, "llama.cpp": gguf_job}


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

    def summary(self) -> dict:
        """What a farm job's result records (the store's `result`)."""
        return {"artifact": self.artifact, "revision": self.revision, "recipe_key": self.recipe_key,
                "calibration_hash": self.calibration_hash, "seconds": self.seconds,
                "size_before_bytes": self.size_before_bytes, "size_after_bytes": self.size_after_bytes,
                "perplexity": self.perplexity, "recovery": self.recovery,
                "recovery_basis": self.evaluation.get("recovery_basis"), "warnings": self.warnings}


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


def maker_of(spec: JobSpec):
    return MAKERS[formats.get(spec.format).made_by]


def run(spec: JobSpec, ctx, **settings) -> Result:
    """Run the whole job and return its summary; the artifact lands in ctx.out_dir with its report files.
    `ctx`: a JobContext, or the output folder with JobContext's other fields as keywords."""
    ctx = ctx if isinstance(ctx, JobContext) else JobContext(ctx, **settings)
    maker, clock = maker_of(spec), Clock()
    reused_before = Counter(ctx.shared.reused)
    storage.check_replaceable(ctx.out_dir, ctx.overwrite)
    storage.check_writable(ctx.out_dir)                                 # before anything is loaded
    job = clock.run("load", open_job, spec, ctx, maker)
    made = maker.make(job)
    for k, v in made.seconds.items():
        clock.seconds[k] = clock.seconds.get(k, 0.0) + v
    job.release_model()                                                 # freed before the evaluation
    try:
        merged = clock.run("evaluate_sources", merge_part, job, made.plan) if job.src.merge is not None else None
        evaluation, parts = {}, {}
        if made.plan is not None:
            evaluation, parts = clock.run("evaluate_quantized", maker.evaluate, job, made)
        made = maker.finish(job, made)
    except BaseException:
        if made.folder != ctx.out_dir:                                  # a work folder not put in place
            shutil.rmtree(made.folder, ignore_errors=True)
        raise
    serving_part = None
    if spec.evaluation.serving and maker.SERVES:
        serving_part = clock.run("serving", measure_serving, job, made.folder)

    made.settings.update(revision=job.revision, calibration=job.calibration_settings(made.calib))
    calib = made.calib
    result = Result(artifact=str(made.folder), model=spec.model, revision=job.revision,
                    recipe_key=spec.recipe_key(job.revision),
                    calibration_hash=calib.content_hash if calib is not None else None,
                    calibration_source=calib.source if calib is not None else None, seconds=clock.total(),
                    size_before_bytes=made.size_before, size_after_bytes=made.size_after,
                    perplexity=perplexity_summary(evaluation), layers=made.layers, warnings=made.warnings,
                    preflight=made.checks, coverage=made.coverage, settings=made.settings,
                    bits_per_weight=made.bits_per_weight, evaluation=evaluation,
                    reused=dict(ctx.shared.reused - reused_before), serving=serving_part, merge=merged,
                    llama_cpp=parts.get("llama_cpp"))
    report.write(made.folder, {"quantfarm": quantfarm_version(), "spec": spec.model_dump(),
                               "source_card": source_card(job.src), **asdict(result)})
    return result


def open_job(spec: JobSpec, ctx: JobContext, maker) -> Job:
    """The source resolved and pinned, and the maker's preflight made from its config before any weights are
    fetched (a Hub model) or merged (a merge recipe) or loaded."""
    found = []
    ctx.on_step("resolve")

    def check(src):
        facts = model_facts(src)
        found.append((facts, *maker.preflight(ctx, spec, src, facts)))
    src, revision = resolve_pinned(spec, ctx, before_weights=check)
    if not found:
        check(src)
    facts, checks, extra = found[0]
    return Job(spec, formats.get(spec.format), src, revision, facts, checks, ctx, found=extra)


def resolve_key(spec, model_roots) -> tuple:
    """What a resolved source is remembered under in a Shared (a release's variants find it there)."""
    return (spec.model, spec.revision, spec.allow_pickle, spec.trust_remote_code, tuple(map(str, model_roots or ())),
            json.dumps(spec.merge, sort_keys=True))


def resolve_pinned(spec: JobSpec, ctx: JobContext, before_weights=None) -> tuple:
    """(the resolved source, its pinned revision), refusing a local source (or a merge) whose content changed
    since the job was made (its revision is then a content hash). The source is pinned from its config and
    index files first; `before_weights(src)` makes the checks those answer, and only then are a Hub model's
    weights fetched (with progress steps) and a merge recipe merged (both cached)."""
    key = resolve_key(spec, ctx.model_roots)
    src = ctx.shared.get("resolve", key, lambda: resolve_source(spec, local_roots=ctx.model_roots,
                                                                build_merge=False, weights=False))
    revision = src.revision or src.content_hash
    if src.revision is None and spec.revision and spec.revision != src.content_hash:
        what = "its merge recipe's sources" if spec.merge is not None else "its files"
        raise ModelSourceError(f"{spec.model} was pinned at content hash {spec.revision[:16]}... when the job was "
                               f"made, and {what} now hash to {src.content_hash[:16]}...: the model changed since; "
                               "submit it again to quantize what is there now")
    if merge.incomplete(src):
        if before_weights is not None:
            before_weights(src)
        src = merge.complete(src, on_step=ctx.on_step, should_stop=ctx.should_stop)
        ctx.shared.put("resolve", key, src)
    return src, revision
