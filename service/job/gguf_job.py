"""A GGUF job: llama.cpp's converter and llama-quantize make the artifact, quantfarm the importance matrix.

preflight (tools, architecture, per-tensor fallbacks, room; from the config) -> evaluate fp16 -> calibrate ->
F16 GGUF (converter) -> importance matrix -> llama-quantize -> evaluate -> shard -> the folder put in place.

What does not depend on the GGUF type is made once: the F16 file and the importance matrix are cached on
disk by source revision (and calibration) and memoized in the release's Shared, so every size of a
release quantizes the same F16 file with the same matrix. Evaluation is twofold: llama-perplexity's
perplexity and KLD against the F16 file (the reference GGUF users compare with), and the suite's rows
with the GGUF's weights as transformers' GGUF loader dequantizes them.
"""
import json
import shutil
from collections import Counter
from pathlib import Path

from filelock import FileLock
from torch import nn

from core.errors import SpecError
from core.paths import atomic_file, cache_root, swap_folder, work_folder, write_atomic
from evaluation import suite
from quantizers import imatrix as imx
from quantizers import llama_cpp, moe
from quantizers.formats import gguf as fmt
from quantizers.walk import Cancelled

from . import storage
from .context import Clock, JobContext
from .loading import fp16_folder
from .shared import Shared
from .spec import JobSpec
from .steps import Job, Made, calibrate, fp16_baseline


# Files above this are split without being asked: the Hugging Face Hub takes files of at most 50 GB.
AUTO_SHARD, AUTO_SHARD_ABOVE = "48G", 48 * 10 ** 9


def _check_stop(ctx: JobContext):
    if ctx.stopped():
        raise Cancelled("cancelled")


def architecture(folder: Path, t: llama_cpp.Tools) -> str:
    """The checkpoint's architecture, refused before any work when llama.cpp's converter has no class for it."""
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    known = llama_cpp.architectures(t.root)
    if not archs or archs[0] not in known:
        raise SpecError(f"llama.cpp's converter cannot convert {archs[0] if archs else 'this model'} (its "
                        f"convert_hf_to_gguf.py has no class for it); GGUF is not available for this model")
    return archs[0]


def input_widths(model) -> dict[str, int]:
    """{kind of decoder weight (q_proj, down_proj, ...): its input width}: what llama-quantize's blocks must
    divide. Fused experts (a config-only model's) count by their 3-D weights: [E, out, in]."""
    out = {}
    for n, m in model.named_modules():
        if ".layers." not in n:
            continue
        if isinstance(m, nn.Linear) and not moe.is_router(n):
            out[n.rsplit(".", 1)[-1]] = m.in_features
        elif moe.is_fused_experts(m):
            t = getattr(m, "is_transposed", False)
            out["experts.gate_up_proj"] = m.gate_up_proj.shape[1 if t else 2]
            out["experts.down_proj"] = m.down_proj.shape[1 if t else 2]
    return out


def f16_file(src_folder: Path, revision: str, t: llama_cpp.Tools, name: str) -> Path:
    """The F16 conversion of the source, once per revision and llama.cpp build (cache_root()/gguf-f16)."""
    out = cache_root() / "gguf-f16" / f"{revision[:40]}-{t.root.name}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            llama_cpp.convert(t, src_folder, tmp, name)
    return out


def model_name(ref: str) -> str:
    """smollm2-135m, org/Name-7B -> Name-7B, /models/x/ -> x, a.gguf -> a: the files' and metadata's name."""
    return Path(ref.rstrip("/").split("@")[0]).name.removesuffix(".gguf")


def eval_text_file(plan, tokenizer, work: Path, n_tokens: int) -> Path:
    """The suite's held-out text, decoded, for llama-perplexity (which tokenizes it itself)."""
    out = work / "eval.txt"
    out.write_text(tokenizer.decode(plan.tokens[:n_tokens], skip_special_tokens=True))
    return out


def llama_eval(plan, f16: Path, quant: Path, tokenizer, t: llama_cpp.Tools, shared: Shared) -> dict:
    """llama-perplexity on the held-out text: the F16 file's perplexity (its logits saved as the KLD base,
    once per F16 file and text) and the quantized file's perplexity, KLD and same-top-token rate against it."""
    ev = plan.ev
    ctx, chunks = ev.window_len, ev.n_windows
    base_dir = cache_root() / "gguf-kld" / f"{f16.stem}-{plan.keys['text'][:16]}"

    def base():
        """Made by one process at a time (a farm's workers share the cache): the logits under a temporary
        name, renamed, then f16.json, whose presence says both are complete."""
        base_dir.mkdir(parents=True, exist_ok=True)
        meta = base_dir / "f16.json"
        with FileLock(str(base_dir / ".lock")):
            if not meta.is_file() or not (base_dir / "logits.bin").is_file():
                text = eval_text_file(plan, tokenizer, base_dir, (chunks + 1) * ctx * 2)
                with atomic_file(base_dir / "logits.bin") as tmp:
                    res = llama_cpp.perplexity(t, f16, text, ctx, chunks, save_base=tmp)
                write_atomic(meta, json.dumps(res))
        return json.loads(meta.read_text())

    f16_res = shared.get("gguf_kld_base", str(base_dir), base)
    q = llama_cpp.perplexity(t, quant, None, ctx, chunks, kld_base=base_dir / "logits.bin")
    return {"tool": "llama-perplexity", "ctx": ctx, "chunks": chunks, "text": plan.text_desc,
            "fp16": f16_res, "quantized": q,
            "recovery": f16_res["perplexity"] / q["perplexity"] if q.get("perplexity") else None}


def load_gguf(path: Path, dtype):
    """The GGUF as transformers' GGUF loader dequantizes it (what the suite's task rows evaluate)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


def preflight(ctx: JobContext, spec: JobSpec, src, facts) -> tuple[dict | None, dict]:
    """What the config answers before any weights: llama.cpp's tools are built, its converter knows the
    architecture, which weights fall back to another type, and room for the file and the F16 conversion.
    Returns (the preflight report, {tools, architecture, fallback note}); (None, ...) without facts."""
    t = llama_cpp.tools()
    folder = Path(src.path) if src.merge is None or src.merge.built else fp16_folder(src.merge.base())
    arch = architecture(folder, t) if (folder / "config.json").is_file() and not src.gguf_file else None
    found = {"tools": t, "architecture": arch}
    if facts is None:
        return None, found
    return _check(ctx, spec, facts.meta_model, found), found


def _check(ctx: JobContext, spec: JobSpec, model, found: dict) -> dict:
    found["note"] = note = fmt.fallback_note(spec.gguf_type, input_widths(model))
    n_params = sum(p.numel() for p in model.parameters())
    storage.check_space(ctx.out_dir, fmt.GGUF().estimate_bytes(model, None))
    storage.check_space(cache_root(), n_params * 2)                     # the F16 conversion
    found["n_params"] = n_params
    return {"runtimes": [{"runtime": "llama.cpp", "ok": True, "path": "llama.cpp (llama-completion, llama-cli, "
                          "llama-server; Ollama, LM Studio)", "notes": [note] if note else []},
                         {"runtime": "transformers", "ok": True, "path": "GGUF loader (dequantized to 16 bits)",
                          "notes": []}]}


def make(job: Job) -> Made:
    """F16 file (cached), importance matrix (cached), llama-quantize into a work folder beside the output."""
    ctx, spec, clock = job.ctx, job.spec, Clock()
    t = job.found["tools"]
    folder = fp16_folder(job.src)
    arch = job.found["architecture"] or architecture(folder, t)
    checks = job.checks or _check(ctx, spec, job.fp16(), job.found)
    # the suite's KLD needs the fp16 head, which llama-quantize quantizes too: llama.cpp's KLD stands for it
    ev = spec.evaluation
    if "kld" in ev.parts:
        ev = ev.model_copy(update={"suite": [p for p in ev.parts if p != "kld"]})
    plan, base = clock.run("evaluate_fp16", fp16_baseline, job, ev)
    calib = clock.run("calibrate", calibrate, job) if job.fmt.needs_calibration(spec, False) else None
    _check_stop(ctx)

    ctx.on_step("convert")
    f16 = clock.run("convert", ctx.shared.get, "gguf_f16", (job.revision, str(t.root)),
                    lambda: f16_file(folder, job.revision, t, model_name(spec.model)))
    _check_stop(ctx)
    imat = None
    if calib is not None:
        ctx.on_step("importance matrix")
        where = cache_root() / "gguf-imatrix" / f"{f16.stem}-{calib.content_hash[:24]}-{spec.imatrix}.gguf"
        imat = clock.run("imatrix", ctx.shared.get, "gguf_imatrix", str(where),
                         lambda: imx.make_file(spec.imatrix, job.fp16() if spec.imatrix == "quantfarm" else None,
                                              calib, f16, job.tokenizer(), t, ctx.dev, where))
    job.release_model()                                                 # freed before llama-quantize
    _check_stop(ctx)

    ctx.on_step("quantize")
    out = ctx.out_dir
    work = work_folder(out)                                             # becomes `out` in finish()
    try:
        qfile = work / f"{model_name(spec.model)}-{spec.gguf_type}.gguf"
        fallback_lines = clock.run("quantize", llama_cpp.quantize, t, f16, qfile, spec.gguf_type, imat)
        if imat is not None:
            shutil.copyfile(imat, work / "imatrix.gguf")
        job.tokenizer().save_pretrained(work)                            # transformers' GGUF users read it
        sizes = fmt.file_summary(qfile)
        _check_stop(ctx)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    note = job.found.get("note")
    settings = {"format": spec.format, "gguf_type": spec.gguf_type, "imatrix": spec.imatrix, "architecture": arch,
                "files": [qfile.name], "llama_cpp": t.root.name, "fallbacks": dict(Counter(fallback_lines))}
    return Made(work, plan, base, calib, settings, {**checks, "settings": settings},
                {"fraction": sizes["fraction_quantized"], "types": sizes["weight_types"]}, sizes["bits_per_weight"],
                job.found["n_params"] * 2, clock.seconds, warnings=[note] if note else [],
                work={"f16": f16, "qfile": qfile})


def evaluate(job: Job, made: Made) -> tuple[dict, dict]:
    """llama-perplexity against the F16 file (the report's llama_cpp part) and the suite on the file as
    transformers' GGUF loader dequantizes it."""
    ctx, t = job.ctx, job.found["tools"]
    ctx.on_step("evaluate artifact")
    f16, qfile, tok = made.work["f16"], made.work["qfile"], job.tokenizer()
    lcpp = llama_eval(made.plan, f16, qfile, tok, t, ctx.shared) if made.plan.text else None
    evaluation = suite.compare(made.plan, made.base, made.plan.quantized(load_gguf(qfile, ctx.dtype).to(ctx.dev), tok))
    return evaluation, {"llama_cpp": lcpp}


def finish(job: Job, made: Made) -> Made:
    """Shard when asked (or when a file is over the Hub's limit), then put the work folder in place."""
    qfile, work, out = made.work["qfile"], made.folder, job.ctx.out_dir
    try:
        files = [qfile.name]
        shard = job.spec.gguf_shard or (AUTO_SHARD if qfile.stat().st_size > AUTO_SHARD_ABOVE else None)
        if shard:
            job.ctx.on_step("shard")
            files = [p.name for p in llama_cpp.split(job.found["tools"], qfile, shard)]
        swap_folder(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    made.settings["files"] = files
    made.checks["settings"] = made.settings          # a GGUF's preflight settings are the settings used
    made.folder, made.size_after = out, sum((out / f).stat().st_size for f in files)
    return made


SERVES = False           # the serving measurement runs vLLM on safetensors checkpoints only
WALKS = False            # no layer walk: llama.cpp's tools and one forward for the importance matrix
