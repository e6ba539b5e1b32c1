"""Evaluate a finished artifact again, against its fp16 source, with other evaluation settings
(`quantfarm evaluate`): the report files are rewritten with the new evaluation."""
from pathlib import Path
from typing import Callable

from calibration import eval_tokens
from calibration.data import resolve_eval_source
from core.errors import ArtifactError, NotImplementedFeature
from evaluation import report, suite
from quantizers import artifact, formats

from .context import _noop, compute_dtype, pick_device
from .merge import resolve_source
from .models import resolve_model
from .sources import Access
from .pipeline import perplexity_summary
from .spec import JobSpec
from .steps import load_rounded


def evaluate_artifact(folder, ev: suite.Evaluation, *, device: str = "auto", cache_dir=None,
                      on_step: Callable[[str], None] = _noop) -> dict:
    """Evaluate a finished artifact against its fp16 source (named in its report.json, else in its
    quantization_config's meta) and rewrite its report files; returns the evaluation."""
    folder = Path(folder)
    rep = report.read(folder)
    spec = rep.get("spec") or {}
    fmt = formats.FORMATS.get(spec.get("format"))
    if fmt is not None and fmt.made_by != "walk":
        raise NotImplementedFeature(f"{folder} is a {fmt.title} artifact: evaluating it again is not implemented; run "
                                    "its job again with the evaluation settings you want (what does not depend on "
                                    "the evaluation is cached, so only the quantization and the evaluation run)")
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
                            Access(spec.get("allow_pickle", False), spec.get("trust_remote_code", False)))
    pinned = src.revision or src.content_hash
    if revision and pinned != revision:
        raise ArtifactError(f"{folder} was made from {model_id} @ {revision}, but that now resolves to {pinned}; "
                            "the fp16 baseline would be of a different model")
    fp16 = {}

    def load_fp16():
        if not fp16:
            on_step("load fp16")
            model, tok = load_rounded(src, dtype)
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
