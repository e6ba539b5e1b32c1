"""The steps every maker shares: the job's record (`Job`), the fp16 model loaded when first needed, its
baseline evaluation, the calibration set, a merged source's part of the report and vLLM's serving numbers.
Each returns what it made; `pipeline.run` and the makers time them."""
from dataclasses import dataclass, field

import torch

from calibration import build_calibration, eval_tokens
from calibration.data import resolve_calibration_source, resolve_eval_source
from evaluation import serving, suite
from quantizers import artifact, moe
from quantizers.formats import Format

from . import merge
from .context import JobContext
from .facts import ModelFacts
from .loading import fp16_folder, load_model, load_tokenizer
from .sources import ResolvedModel
from .spec import JobSpec


def round_to_storage(model) -> torch.dtype:
    """Round float weights to the 16-bit storage dtype in place (keeping the compute dtype): the fp16
    baseline is then the model as a 16-bit checkpoint holds it, and the quantizer starts from it."""
    dtype = artifact.storage_dtype(model)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype).to(p.dtype)
    return dtype


def load_rounded(src: ResolvedModel, dtype: torch.dtype = torch.float32) -> tuple:
    """(model, tokenizer) of the source in `dtype`, its weights rounded to their 16-bit storage dtype: the model
    every baseline and quantizer starts from."""
    model, tok = load_model(src, dtype=dtype)
    round_to_storage(model)
    return model, tok


@dataclass
class Job:
    """One job's source and what its steps made so far. `checks`: the preflight report (None when the
    model's config could not answer it: the maker checks the loaded model)."""
    spec: JobSpec
    fmt: Format
    src: ResolvedModel
    revision: str
    facts: ModelFacts | None
    checks: dict | None
    ctx: JobContext
    found: dict = field(default_factory=dict)     # what the maker's preflight found (GGUF: tools, architecture)
    _model: object = None
    _tokenizer: object = None

    def fp16(self):
        """The fp16 model in the compute dtype, rounded to its storage dtype, MoE experts unfused: loaded on
        first use (a release's later variants that find everything cached never load it)."""
        if self._model is None:
            self.ctx.on_step("load")
            self._model, self._tokenizer = load_rounded(self.src, self.ctx.dtype)
            moe.unfuse_experts(self._model)                             # experts as per-expert Linears
        return self._model

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.src)
        return self._tokenizer

    def release_model(self) -> None:
        self._model = None

    def calibration_settings(self, calib) -> dict | None:
        c = self.spec.calibration
        return None if calib is None else {"source": calib.source, "samples": c.samples, "seq_len": c.seq_len,
                                           "seed": c.seed, "hash": calib.content_hash}


def calibrate(job: Job):
    """The calibration set, built once per setting in the context's Shared (the fp16 model is asked for
    only when the calibration text is sampled from it)."""
    job.ctx.on_step("calibrate")
    c, dtype = job.spec.calibration, job.ctx.dtype
    model = job.fp16() if resolve_calibration_source(c.source) == "model" else None
    return job.ctx.shared.get("calibration", (job.revision, str(dtype), *c.model_dump().values()),
                              lambda: build_calibration(c.source, job.tokenizer(), n_samples=c.samples,
                                                        seq_len=c.seq_len, seed=c.seed, model=model))


def fp16_baseline(job: Job, ev: suite.Evaluation) -> tuple:
    """(the evaluation plan, the fp16 model's results), both None without an evaluation suite. The fp16
    model is asked for only on a baseline cache miss or for model-sampled text; it goes back to the CPU
    after (the walk streams layers to the device itself)."""
    if not ev.parts:
        return None, None
    ctx = job.ctx
    ctx.on_step("evaluate fp16")
    text = (job.revision, ev.text, str(ctx.dtype))
    sampled = resolve_eval_source(ev.text) == "model"
    plan = suite.EvaluationPlan(ev, job.spec.model, job.revision, ctx.dtype, ctx.dev, text_tokens=lambda: ctx.shared.get(
        "eval_text", text, lambda: eval_tokens(ev.text, job.tokenizer(), model=job.fp16() if sampled else None)))
    on_device = []

    def load_fp16():                                    # only on a baseline cache miss
        on_device.append(job.fp16().to(ctx.dev))
        return on_device[0], job.tokenizer()
    base = plan.baseline(ctx.shared.baseline_cache(ctx.cache_dir), load_fp16)
    for model in on_device:
        model.to("cpu")
    return plan, base


def merge_part(job: Job, plan) -> dict | None:
    """A merged source's part of the report: the recipe, each source at its revision and, with an evaluation,
    each source's fp16 scores (cached like any baseline) beside the merged model's; None for other sources."""
    src, ctx = job.src, job.ctx
    if src.merge is None:
        return None
    part = merge.provenance(src.merge)
    if plan is not None:
        ctx.on_step("evaluate merge sources")

        def load(s):
            m, tok = load_rounded(s, ctx.dtype)
            return m.to(ctx.dev), tok
        scores = merge.source_scores(src.merge, plan, ctx.shared.baseline_cache(ctx.cache_dir), load, ctx.dtype,
                                     ctx.dev)
        for row in part["sources"]:
            row.update(scores[row["model"]])
    return part


def measure_serving(job: Job, folder) -> dict:
    """The report's serving part; the fp16 model's numbers once per source and device (a release's variants
    share them). Where vLLM cannot run here the part says why instead of failing the job."""
    ctx = job.ctx
    ctx.on_step("measure serving")
    key = (job.src.content_hash, str(ctx.dev))
    try:
        fp16 = ctx.shared.peek("serving_fp16", key)
        part = serving.measure(folder, fp16_folder(job.src), str(ctx.dev), fp16_result=fp16)
        if fp16 is None and "error" not in part["models"]["fp16"]:
            ctx.shared.put("serving_fp16", key, part["models"]["fp16"])
        return part
    except serving.ServingUnavailable as e:
        return {"error": str(e)}


@dataclass
class Made:
    """What a maker made, for the pipeline's evaluation and report. `folder`: where the artifact is (GGUF:
    its work folder until `finish` puts it in place)."""
    folder: object
    plan: object
    base: object
    calib: object
    settings: dict
    checks: dict
    coverage: dict
    bits_per_weight: dict
    size_before: int
    seconds: dict
    layers: list = field(default_factory=list)
    size_after: int = 0                           # the artifact's bytes, known once `finish` put it in place
    warnings: list = field(default_factory=list)
    work: dict = field(default_factory=dict)      # the maker's own hand-over to its evaluate/finish
