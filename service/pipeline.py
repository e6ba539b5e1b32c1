"""One quantization job, step by step: resolve -> load -> calibrate -> quantize -> save -> evaluate.

The CLI's `quantize` and (later) the job workers both call `run`; the steps report progress
through callbacks so each front end shows it its own way.
"""
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

from calibration import build_calibration, eval_tokens
from evaluation.perplexity import perplexity
from quantizers import artifact, awq_format, ct_format, gptq_format
from quantizers.driver import LayerReport, QuantConfig, quantize_model

from . import preflight
from .errors import ArtifactError, SpecError
from .sources import load_model, resolve_model
from .spec import JobSpec


def quantfarm_version() -> str:
    try:
        return version("quantfarm")
    except PackageNotFoundError:
        return "0+unknown"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


@dataclass
class Result:
    artifact: str
    model: str
    revision: str | None
    recipe_key: str
    calibration_hash: str
    seconds: dict = field(default_factory=dict)
    size_before_bytes: int = 0
    size_after_bytes: int = 0
    perplexity: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    preflight: dict = field(default_factory=dict)


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


def settings(cfg: QuantConfig, fmt: str) -> preflight.Settings:
    act = "none" if not cfg.desc_act else ("static" if cfg.static_groups else "dynamic")
    return preflight.Settings(fmt, cfg.algorithm, cfg.bits, cfg.group_size, cfg.sym, act)


def with_scale_dtype(cfg: QuantConfig, fmt: str, model) -> QuantConfig:
    """compressed-tensors stores scales in the model's dtype, GPTQ and AWQ in float16: the grids
    round scales to that dtype before choosing codes, so the artifact holds exactly what was computed."""
    dtype = artifact.storage_dtype(model) if fmt == "compressed-tensors" else torch.float16
    return dataclasses.replace(cfg, scale_dtype=str(dtype).removeprefix("torch."))


def quantization_config(cfg: QuantConfig, fmt: str, meta: dict) -> tuple[dict, dict]:
    """(config.json's quantization_config, {side file name: content}) for a format."""
    if fmt == "gptq":
        qc = gptq_format.quantization_config(cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups,
                                             cfg.true_sequential, cfg.damp_percent, meta)
        return qc, {"quantize_config.json": qc}
    if fmt == "awq":
        return awq_format.quantization_config(cfg.group_size, meta), {"quant_config.json": awq_format.side_file(cfg.group_size)}
    if fmt == "compressed-tensors":
        actorder = "static" if cfg.desc_act and cfg.static_groups else None
        return ct_format.quantization_config(cfg.bits, cfg.group_size, cfg.sym, actorder, meta), {}
    raise SpecError(f"unknown format {fmt!r}")


def save(out_dir, model, tokenizer, quantized, cfg: QuantConfig, fmt: str, meta: dict, overwrite: bool = False) -> Path:
    """Write the artifact in one of the formats, with its quantization_config and side file."""
    qc, side = quantization_config(cfg, fmt, meta)
    layout = qc.get("checkpoint_format", fmt)      # gptq_v2 for asymmetric GPTQ
    return artifact.write_artifact(out_dir, model, tokenizer, quantized, layout, qc, side_files=side,
                                   overwrite=overwrite)


def artifact_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def run(spec: JobSpec, out_dir, *, device: str = "auto", state_dir=None, overwrite: bool = False,
        on_step: Callable[[str], None] = _noop, on_layer: Callable[[LayerReport, int], None] = _noop,
        should_stop: Callable[[], bool] | None = None) -> Result:
    """Run the whole job and return its summary; the artifact lands in `out_dir`."""
    times = {}
    t0 = time.perf_counter()
    dev = pick_device(device)
    if Path(out_dir).exists() and not overwrite:
        raise ArtifactError(f"{out_dir} already exists; choose another --out or pass --overwrite")

    on_step("resolve")
    src = resolve_model(spec.model, spec.revision, allow_pickle=spec.allow_pickle,
                        trust_remote_code=spec.trust_remote_code)
    revision = src.revision or src.content_hash
    model, tokenizer = load_model(src, dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16)
    round_to_storage(model)
    cfg = with_scale_dtype(spec.quant_config(), spec.format, model)
    checks = preflight.report(settings(cfg, spec.format), preflight.model_shapes(model))
    preflight.refuse_unwritable(checks)                                 # before any quantization work
    notes = [f"{v['runtime']}: {n}" for v in checks["runtimes"] for n in v["notes"]]
    size_before = sum(p.numel() for p in model.parameters()) * 2
    times["load"] = time.perf_counter() - t0

    ppl = {}
    ev = None
    if spec.evaluation.suite == "perplexity":
        on_step("evaluate fp16")
        t = time.perf_counter()
        ev, ev_desc = eval_tokens(spec.evaluation.text, tokenizer, model=model)
        ppl = {"text": ev_desc, "windows": spec.evaluation.n_windows, "window_len": spec.evaluation.window_len,
               "fp16": perplexity(model, ev, spec.evaluation.window_len, max_windows=spec.evaluation.n_windows)}
        times["evaluate_fp16"] = time.perf_counter() - t

    calib = None
    if cfg.algorithm != "rtn":
        on_step("calibrate")
        t = time.perf_counter()
        c = spec.calibration
        calib = build_calibration(c.source, tokenizer, n_samples=c.samples, seq_len=c.seq_len, seed=c.seed,
                                  model=model)
        times["calibrate"] = time.perf_counter() - t

    on_step("quantize")
    t = time.perf_counter()
    recipe = spec.recipe(revision)
    if calib is not None:
        recipe["calibration_hash"] = calib.content_hash
    quantized, reports = quantize_model(model, calib.tokens if calib is not None else None, cfg, dev,
                                        checkpoint_dir=state_dir, recipe=recipe, on_layer=on_layer,
                                        should_stop=should_stop)
    times["quantize"] = time.perf_counter() - t

    on_step("save")
    t = time.perf_counter()
    key = spec.recipe_key(revision)
    meta = {"quantizer": [f"quantfarm:{quantfarm_version()}"], "recipe_hash": key,
            "calibration_hash": calib.content_hash if calib is not None else None,
            "calibration": calib.source if calib is not None else None,
            "source_model": spec.model, "source_revision": revision, "algorithm": cfg.algorithm}
    out = save(out_dir, model, tokenizer, quantized, cfg, spec.format, meta, overwrite=overwrite)
    times["save"] = time.perf_counter() - t
    del model

    if ev is not None:
        on_step("evaluate artifact")
        t = time.perf_counter()
        qmodel, _, _ = artifact.load_artifact(out, dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16,
                                              with_tokenizer=False)
        qmodel.to(dev)
        ppl["quantized"] = perplexity(qmodel, ev, spec.evaluation.window_len, max_windows=spec.evaluation.n_windows)
        ppl["ratio"] = ppl["quantized"] / ppl["fp16"]
        times["evaluate_quantized"] = time.perf_counter() - t
        del qmodel
    times["total"] = time.perf_counter() - t0

    result = Result(artifact=str(out), model=spec.model, revision=revision, recipe_key=key,
                    calibration_hash=meta["calibration_hash"], seconds=times, size_before_bytes=size_before,
                    size_after_bytes=artifact_bytes(out), perplexity=ppl,
                    layers=[{"index": r.index, "seconds": r.seconds, "modules": r.modules} for r in reports],
                    warnings=notes, preflight=checks)
    report = {"quantfarm": quantfarm_version(), "spec": spec.model_dump(), **asdict(result)}
    artifact.add_file(out, "report.json", json.dumps(report, indent=2) + "\n")
    return result
