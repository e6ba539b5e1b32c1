"""`quantfarm inspect`: what an artifact folder holds, read from its config and safetensors headers
(no weights are loaded), with the preflight verdicts for its shapes and any report numbers."""
import json
import math
import re
import struct
from pathlib import Path

from core.errors import ArtifactError
from quantizers import formats
from quantizers.artifact import read_quant_config
from quantizers.moe import has_experts, is_router
from quantizers.schemes import SCHEMES

from . import preflight


def _headers(folder: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} from every safetensors file's JSON header."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        out.update({k: v for k, v in header.items() if k != "__metadata__"})
    if not out:
        raise ArtifactError(f"{folder} holds no .safetensors files")
    return out


def target_of(qc: dict, headers: dict) -> preflight.Target:
    """What the artifact is, from its quantization_config (the format's own reading) and its tensor names."""
    fmt = formats.of_config(qc)
    scheme, alg = fmt.scheme_of(qc)
    return preflight.Target(fmt.name, alg, scheme, has_experts(headers))


def quantized_shapes(headers: dict, t: preflight.Target) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} from packed tensor shapes."""
    fmt, out = formats.get(t.format), {}
    for k, h in headers.items():
        found = fmt.linear_shape(k, h, t.scheme)
        if found:
            out[found[0]] = found[1]
    return out


LAYER = re.compile(r"(^|\.)layers\.\d+\.")       # a tensor inside a decoder layer


def coverage_of(headers: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """The share of the decoder layers' weight matrices stored quantized, from the headers alone: the
    artifact's own answer, whatever report.json says. Routers are 16-bit on purpose and listed apart."""
    quantized = sum(i * o for m, (i, o) in shapes.items() if LAYER.search(m))
    plain, routers = {}, []
    for k, h in headers.items():
        if LAYER.search(k) and k.endswith(".weight") and len(h["shape"]) >= 2 and k[:-7] not in shapes:
            if is_router(k[:-7]):
                routers.append(k[:-7])
            else:
                plain[k[:-7]] = math.prod(h["shape"])
    return {"fraction": quantized / max(quantized + sum(plain.values()), 1), "sixteen_bit": sorted(plain),
            "routers": sorted(routers)}


def describe(path) -> dict:
    folder = Path(path)
    for fmt in formats.FORMATS.values():           # a format whose files `inspect` reads itself (GGUF)
        files = fmt.artifact_files(folder)
        if files:
            return fmt.describe_files(files)
    qc = read_quant_config(folder)
    config = json.loads((folder / "config.json").read_text())
    headers = _headers(folder)
    t = target_of(qc, headers)
    shapes = quantized_shapes(headers, t)
    checks = preflight.report(t, set(shapes.values()))
    d = {
        "artifact": str(folder.resolve()),
        "format": t.format,
        "quantization_config": {k: v for k, v in qc.items() if k != "meta"},
        "settings": checks["settings"],
        "quantizer": qc.get("meta", {}),
        "model": {"architectures": config.get("architectures"), "layers": config.get("num_hidden_layers"),
                  "hidden_size": config.get("hidden_size"), "dtype": config.get("dtype") or config.get("torch_dtype")},
        "sizes": {"safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                  "quantized_modules": len(shapes), "tensors": len(headers)},
        "coverage": coverage_of(headers, shapes),
        "compatibility": checks["runtimes"],
    }
    rep = folder / "report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        ev = r.get("evaluation") or {}
        d["report"] = {"perplexity": r.get("perplexity"), "seconds": r.get("seconds"), "recovery": ev.get("recovery"),
                       "recovery_basis": ev.get("recovery_basis"),
                       "size_before_bytes": r.get("size_before_bytes"), "size_after_bytes": r.get("size_after_bytes")}
    return d


def render(d: dict) -> str:
    own = formats.get(d["format"]).render(d)
    if own is not None:
        return own
    s, mb = d["settings"], 2 ** 20
    lines = [f"artifact     {d['artifact']}",
             f"format       {d['format']} "
             + (f"{SCHEMES[s['scheme']].words()} " if s.get("scheme") else "")
             + f"{s['bits']}-bit g{s['group_size']} {'sym' if s['sym'] else 'asym'}"
             f"{' act-order ' + s['act_order'] if s['act_order'] != 'none' else ''} ({s['algorithm']})",
             f"model        {', '.join(d['model']['architectures'] or ['?'])}, {d['model']['layers']} layers, "
             f"hidden {d['model']['hidden_size']}, {d['model']['dtype']}",
             f"size         {d['sizes']['safetensors_bytes'] / mb:.1f} MiB, "
             f"{d['sizes']['quantized_modules']} quantized Linears"]
    q = d["quantizer"]
    if q:
        lines.append(f"quantizer    {', '.join(q.get('quantizer', []))} from {q.get('source_model')} @ "
                     f"{q.get('source_revision')}; calibration {q.get('calibration')} ({q.get('calibration_hash')})")
    c = d["coverage"]
    left = c["sixteen_bit"]
    lines.append("coverage     " + preflight.coverage_line(
        c["fraction"], f"; {len(c['routers'])} routers 16-bit" if c["routers"] else "",
        f"; 16-bit: {', '.join(left[:4])}" + (f" and {len(left) - 4} more" if len(left) > 4 else "") if left else ""))
    for v in d["compatibility"]:
        lines.append(f"{v['runtime']:<13}{preflight.runtime_line(v)}"
                     + "".join(f"\n             - {n}" for n in preflight.runtime_notes(v)))
    p = (d.get("report") or {}).get("perplexity")
    if p:
        lines.append(f"perplexity   {p['fp16']:.3f} (fp16) -> {p['quantized']:.3f} (quantized), x{p['ratio']:.3f} "
                     f"on {p['windows']} x {p['window_len']} tokens of {p['text']}")
    rep = d.get("report") or {}
    if rep.get("recovery") is not None:
        lines.append(f"recovery     {100 * rep['recovery']:.1f}% ({rep['recovery_basis']}); `quantfarm report` prints the table")
    return "\n".join(lines)
