"""A GGUF job: llama.cpp's converter and llama-quantize make the artifact, quantfarm the importance matrix.

resolve -> preflight (tools, architecture, type, per-tensor fallbacks) -> load -> evaluate fp16 ->
calibrate -> F16 GGUF (converter) -> importance matrix -> llama-quantize -> evaluate -> shard -> report.

What does not depend on the GGUF type is made once: the F16 file and the importance matrix are cached on
disk by source revision (and calibration) and memoized in the release's Shared, so every size of a
release quantizes the same F16 file with the same matrix. Evaluation is twofold: llama-perplexity's
perplexity and KLD against the F16 file (the reference GGUF users compare with), and the suite's rows
with the GGUF's weights as transformers' GGUF loader dequantizes them.
"""
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock
from torch import nn

from core.errors import SpecError
from core.paths import cache_root, write_atomic
from core.version import quantfarm_version
from evaluation import report, suite
from quantizers import imatrix as imx
from quantizers import llama_cpp, moe
from quantizers.formats import gguf as fmt
from quantizers.walk import Cancelled

from . import storage
from .facts import model_facts
from .models import fp16_folder, load_model, load_tokenizer, source_card
from .shared import Shared
from .spec import JobSpec


# Files above this are split without being asked: the Hugging Face Hub takes files of at most 50 GB.
AUTO_SHARD, AUTO_SHARD_ABOVE = "48G", 48 * 10 ** 9


def _check(should_stop):
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled")


def architecture(folder: Path, t: llama_cpp.Tools) -> str:
    """The checkpoint's architecture, refused before any work when llama.cpp's converter has no class for it."""
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    known = llama_cpp.architectures(t.root)
    if not archs or archs[0] not in known:
        raise SpecError(f"llama.cpp's converter cannot convert {archs[0] if archs else 'this model'} (its "
                        f"convert_hf_to_gguf.py has no class for it); GGUF is not available for this model")
    return archs[0]


def preflight(src) -> llama_cpp.Tools:
    """What a farm checks at submission: the tools are built, and (when the source has a config.json to read
    without converting anything) the converter knows its architecture."""
    t = llama_cpp.tools()
    folder = Path(src.path) if src.merge is None or src.merge.built else fp16_folder(src.merge.base())
    if (folder / "config.json").is_file() and not src.gguf_file:
        architecture(folder, t)                 # a merge not made yet: its sources' architecture
    return t


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
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            llama_cpp.convert(t, src_folder, tmp, name)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def model_name(ref: str) -> str:
    """smollm2-135m, org/Name-7B -> Name-7B, /models/x/ -> x, a.gguf -> a: the files' and metadata's name."""
    return Path(ref.rstrip("/").split("@")[0]).name.removesuffix(".gguf")


def make_imatrix(kind: str, model, calib, f16: Path, tokenizer, t: llama_cpp.Tools, dev, out: Path) -> Path:
    """The importance matrix file `out`: ours from the calibration forward, or llama-imatrix's on the same
    text (the calibration rows decoded). Kept when it exists: name it by what it depends on."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n, seq = calib.tokens.shape
    try:
        if kind == "quantfarm":
            import gguf
            r = gguf.GGUFReader(str(f16))
            arch = str(r.fields["general.architecture"].contents())
            blocks = int(r.fields[f"{arch}.block_count"].contents())
            stats = imx.collect(model, calib.tokens, dev)
            table = imx.entries(stats, fmt.name_map(arch, blocks))
            have = {x.name for x in r.tensors}
            table = {k: v for k, v in table.items() if k in have}      # a tied head is token_embd: not a matmul weight here
            imx.write(tmp, table, calib.source, n, seq)
        else:
            text = tmp.with_suffix(".txt")
            text.write_text("\n\n".join(tokenizer.decode(row, skip_special_tokens=True) for row in calib.tokens))
            try:
                llama_cpp.imatrix(t, f16, text, tmp, ctx=seq, chunks=n)
            finally:
                text.unlink(missing_ok=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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
                tmp = base_dir / f".logits.{os.getpid()}.tmp"
                try:
                    res = llama_cpp.perplexity(t, f16, text, ctx, chunks, save_base=tmp)
                    os.replace(tmp, base_dir / "logits.bin")
                finally:
                    tmp.unlink(missing_ok=True)
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


def run(spec: JobSpec, out_dir, *, dev, overwrite: bool, cache_dir, on_step, should_stop, model_roots,
        shared: Shared):
    from .pipeline import (Result, calibrate, compute_dtype, fp16_baseline, merge_part, perplexity_summary,
                           resolve_pinned, round_to_storage)
    times, t0 = {}, time.perf_counter()
    on_step("resolve")
    src, revision = resolve_pinned(spec, shared, model_roots, on_step, should_stop, before_weights=preflight)
    t = llama_cpp.tools()                                               # clear errors before any work
    folder = fp16_folder(src)
    arch = architecture(folder, t)
    dtype = compute_dtype(dev)
    tokenizer = load_tokenizer(src)
    loaded = []

    def fp16():
        """The fp16 model, loaded only when something needs it: a release's later sizes find the baseline,
        calibration, F16 file and importance matrix made and never load it."""
        if not loaded:
            on_step("load")
            model, _ = load_model(src, dtype=dtype)
            round_to_storage(model)
            moe.unfuse_experts(model)                                   # each expert's own tokens for the matrix
            loaded.append(model)
        return loaded[0]

    facts = model_facts(src)
    shape_model = facts.meta_model if facts is not None else fp16()
    widths = input_widths(shape_model)
    note = fmt.fallback_note(spec.gguf_type, widths)
    n_params = sum(p.numel() for p in shape_model.parameters())
    storage.check_space(out_dir, fmt.max_file_bytes(n_params))
    storage.check_space(cache_root(), n_params * 2)                     # the F16 conversion
    times["load"] = time.perf_counter() - t0

    # the suite's KLD needs the fp16 head, which llama-quantize quantizes too: llama.cpp's KLD stands for it
    ev = spec.evaluation
    if "kld" in ev.parts:
        ev = ev.model_copy(update={"suite": [p for p in ev.parts if p != "kld"]})
    plan, base = fp16_baseline(spec.model_copy(update={"evaluation": ev}), fp16, tokenizer, revision, dtype, dev,
                               shared, cache_dir, on_step, times)
    calib = (calibrate(spec, fp16, tokenizer, revision, dtype, shared, on_step, times)
             if spec.imatrix != "none" else None)
    _check(should_stop)

    on_step("convert")
    tc = time.perf_counter()
    f16 = shared.get("gguf_f16", (revision, str(t.root)), lambda: f16_file(folder, revision, t, model_name(spec.model)))
    times["convert"] = time.perf_counter() - tc
    _check(should_stop)
    imat = None
    if calib is not None:
        on_step("importance matrix")
        ti = time.perf_counter()
        where = cache_root() / "gguf-imatrix" / f"{f16.stem}-{calib.content_hash[:24]}-{spec.imatrix}.gguf"
        imat = shared.get("gguf_imatrix", str(where),
                          lambda: make_imatrix(spec.imatrix, fp16() if spec.imatrix == "quantfarm" else None,
                                               calib, f16, tokenizer, t, dev, where))
        times["imatrix"] = time.perf_counter() - ti
    loaded.clear()                                                      # freed before llama-quantize and the evaluation
    _check(should_stop)
    merged = merge_part(src, plan, dtype, dev, shared, cache_dir, on_step, times)

    on_step("quantize")
    tq = time.perf_counter()
    out = Path(out_dir)
    work = out.with_name(f".{out.name}.tmp-{os.getpid()}")          # becomes `out` once everything is made
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        stem = f"{model_name(spec.model)}-{spec.gguf_type}"
        qfile = work / f"{stem}.gguf"
        fallback_lines = llama_cpp.quantize(t, f16, qfile, spec.gguf_type, imat)
        if imat is not None:
            shutil.copyfile(imat, work / "imatrix.gguf")
        tokenizer.save_pretrained(work)                                  # transformers' GGUF users read it
        times["quantize"] = time.perf_counter() - tq
        sizes = fmt.file_summary(qfile)
        _check(should_stop)

        evaluation, lcpp = {}, None
        if plan is not None:
            on_step("evaluate artifact")
            te = time.perf_counter()
            lcpp = llama_eval(plan, f16, qfile, tokenizer, t, shared) if plan.text else None
            evaluation = suite.compare(plan, base, plan.quantized(load_gguf(qfile, dtype).to(dev), tokenizer))
            times["evaluate_quantized"] = time.perf_counter() - te
        files = [qfile.name]
        shard = spec.gguf_shard or (AUTO_SHARD if qfile.stat().st_size > AUTO_SHARD_ABOVE else None)
        if shard:
            on_step("shard")
            files = [p.name for p in llama_cpp.split(t, qfile, shard)]
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times["total"] = time.perf_counter() - t0

    used = {"format": "gguf", "gguf_type": spec.gguf_type, "imatrix": spec.imatrix, "revision": revision,
            "architecture": arch, "files": files, "llama_cpp": t.root.name,
            "fallbacks": dict(Counter(fallback_lines)),
            "calibration": None if calib is None else {"source": calib.source, "samples": spec.calibration.samples,
                                                       "seq_len": spec.calibration.seq_len,
                                                       "seed": spec.calibration.seed, "hash": calib.content_hash}}
    checks = {"runtimes": [{"runtime": "llama.cpp", "ok": True, "path": "llama.cpp (llama-completion, llama-cli, "
                            "llama-server; Ollama, LM Studio)", "notes": [note] if note else []},
                           {"runtime": "transformers", "ok": True, "path": "GGUF loader (dequantized to 16 bits)",
                            "notes": []}], "settings": used}
    key = spec.recipe_key(revision)
    result = Result(artifact=str(out), model=spec.model, revision=revision, recipe_key=key,
                    calibration_hash=calib.content_hash if calib else None,
                    calibration_source=calib.source if calib else None, seconds=times,
                    size_before_bytes=n_params * 2, size_after_bytes=sum((out / f).stat().st_size for f in files),
                    perplexity=perplexity_summary(evaluation), warnings=[note] if note else [], preflight=checks,
                    coverage={"fraction": sizes["fraction_quantized"], "types": sizes["weight_types"]}, settings=used,
                    bits_per_weight=sizes["bits_per_weight"], evaluation=evaluation, llama_cpp=lcpp, merge=merged)
    report.write(out, {"quantfarm": quantfarm_version(), "spec": spec.model_dump(), "source_card": source_card(src),
                       **asdict(result)})
    return result
