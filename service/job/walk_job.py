"""The maker of the packed formats (GPTQ, AWQ, compressed-tensors): the layer walk quantizes the fp16
model in place, decoder layer by decoder layer, and the format's writer packs each Linear.

preflight (from the config: what the format can hold for these Linear shapes, which runtimes load it,
room for the artifact) -> load -> coverage -> fp16 baseline -> calibrate -> walk -> save.
"""
from pathlib import Path

from core.errors import SpecError
from core.version import quantfarm_version
from evaluation import suite
from quantizers import artifact, formats, moe
from quantizers.algorithms import algorithm
from quantizers.layers import mark_kept
from quantizers.walk import check_coverage, coverage, quantize_model

from . import preflight as checks_of
from . import storage
from .context import Clock, JobContext
from .spec import JobSpec
from .steps import Job, Made, calibrate, fp16_baseline


def preflight(ctx: JobContext, spec: JobSpec, src, facts) -> tuple[dict | None, dict]:
    """(the preflight report, {}) from the model's config, refusing settings the format cannot hold and an
    artifact the disk has no room for; (None, {}) when the config cannot tell (the loaded model is checked)."""
    if facts is None:
        return None, {}
    return _check(ctx, spec, facts.meta_model, facts.widest_input), {}


def _check(ctx: JobContext, spec: JobSpec, model, widest: int) -> dict:
    if spec.group_size > widest:
        raise SpecError(f"group_size {spec.group_size} is wider than the model's widest Linear input ({widest}); use "
                        f"-1 for one group per row, or at most {widest}")
    cfg = spec.quant_config()
    checks = checks_of.report(checks_of.Target.of(spec, model), checks_of.model_shapes(model))
    checks_of.refuse_unwritable(checks)
    storage.check_space(ctx.out_dir, formats.get(spec.format).estimate_bytes(model, cfg.scheme))
    return checks


def bits_per_weight(folder: Path, quantized_names: set[str], q_params: int, n_params: int) -> dict:
    """Storage per weight, from the files: of the quantized Linears (codes, scales, zeros, g_idx; the
    names as written) and of the whole model (embeddings, head and norms stay 16-bit)."""
    nbytes = artifact.tensor_nbytes(folder)
    q_bytes = sum(b for k, b in nbytes.items() if k.rsplit(".", 1)[0] in quantized_names)
    return {"quantized_linears": round(8 * q_bytes / max(q_params, 1), 3),
            "overall": round(8 * sum(nbytes.values()) / max(n_params, 1), 3)}


def make(job: Job) -> Made:
    ctx, spec, clock = job.ctx, job.spec, Clock()
    model = clock.run("load", job.fp16)
    cfg = artifact.with_scale_dtype(spec.quant_config(), spec.format, model)
    mark_kept(model, cfg.keep)
    cover = coverage(model, cfg.keep)
    check_coverage(cover)                                               # no silent 16-bit weights
    shapes = checks_of.model_shapes(model)
    checks = job.checks or _check(ctx, spec, model, max(i for i, _ in shapes))
    size_before = sum(p.numel() for p in model.parameters()) * 2

    plan, base = clock.run("evaluate_fp16", fp16_baseline, job, spec.evaluation)
    calibrates = job.fmt.needs_calibration(spec, algorithm(cfg.algorithm).NEEDS_DATA)
    calib = clock.run("calibrate", calibrate, job) if calibrates else None

    ctx.on_step("quantize")
    recipe = spec.recipe(job.revision)
    if calib is not None:
        recipe["calibration_hash"] = calib.content_hash
    quantized, reports = clock.run("quantize", quantize_model, model, calib.tokens if calib is not None else None,
                                   cfg, ctx.dev, state_dir=ctx.state_dir, recipe=recipe, on_layer=ctx.on_layer,
                                   should_stop=ctx.should_stop)
    cover["experts"] = moe.summary(reports)

    ctx.on_step("save")
    meta = {"quantizer": [f"quantfarm:{quantfarm_version()}"], "recipe_hash": spec.recipe_key(job.revision),
            "calibration_hash": calib.content_hash if calib is not None else None,
            "calibration": calib.source if calib is not None else None,
            "source_model": spec.model, "source_revision": job.revision, "algorithm": cfg.algorithm}
    out = clock.run("save", artifact.save, ctx.out_dir, model, job.tokenizer(), quantized, cfg, spec.format, meta,
                    overwrite=ctx.overwrite)
    rename = moe.checkpoint_renamer(model) or (lambda n: n)
    bpw = bits_per_weight(out, {rename(n) for n in quantized}, sum(qw.codes.numel() for qw in quantized.values()),
                          size_before // 2)
    settings = {**checks["settings"], "scale_dtype": cfg.scheme.scale_dtype, "damp_percent": cfg.damp_percent,
                "true_sequential": cfg.true_sequential, "keep": list(cfg.keep),
                "ragged_groups": bool(cfg.scheme.ragged_widths(shapes))}
    notes = [f"{v['runtime']}: {n}" for v in checks["runtimes"] for n in v["notes"]]
    return Made(out, plan, base, calib, settings, checks, cover, bpw, size_before, clock.seconds,
                layers=[{"index": r.index, "seconds": r.seconds, "modules": r.modules} for r in reports],
                warnings=notes)


def evaluate(job: Job, made: Made) -> tuple[dict, dict]:
    """(the suite's comparison on the artifact as our reader loads it, no extra report parts)."""
    job.ctx.on_step("evaluate artifact")
    qmodel, qtok, _ = artifact.load_artifact(made.folder, dtype=job.ctx.dtype)
    return suite.compare(made.plan, made.base, made.plan.quantized(qmodel.to(job.ctx.dev), qtok)), {}


def finish(job: Job, made: Made) -> Made:
    """The artifact was saved in place by `make`: its size is its weight files'."""
    made.size_after = sum(f.stat().st_size for f in Path(made.folder).glob("*.safetensors"))
    return made


SERVES = True            # vLLM serves these formats: evaluation.serving measures them
WALKS = True             # the layer walk's device memory (quantizers/estimates.py) must fit a worker
