"""GGUF, llama.cpp's single-file format, made by llama.cpp's own tools: its converter writes the F16 file
and `llama-quantize` the types below, with an importance matrix (imatrix.py) where given. Unlike the
other formats nothing here packs a Linear: this module knows what llama-quantize will do with each
weight's shape, so preflight can say it before any work, and how checkpoint names become GGUF names.

Block sizes and fallbacks are llama.cpp's (src/llama-quant.cpp, tensor_type_fallback): a weight whose
row length (input width) is not a multiple of its type's block takes a 32-block type instead, and F16
when even that does not divide it."""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from core.errors import SpecError

from .base import Format


@dataclass(frozen=True)
class GGUFType:
    block: int                      # columns per block of the type's main ggml type
    fallback: str = ""              # the ggml type llama-quantize takes when the block does not divide a row
    needs_imatrix: bool = False     # llama-quantize refuses it without an importance matrix


K = dict(block=256)
TYPES: dict[str, GGUFType] = {
    "Q2_K": GGUFType(**K, fallback="Q4_0"), "Q2_K_S": GGUFType(**K, fallback="Q4_0", needs_imatrix=True),
    "Q3_K_S": GGUFType(**K, fallback="Q4_0"), "Q3_K_M": GGUFType(**K, fallback="Q4_0"),
    "Q3_K_L": GGUFType(**K, fallback="Q4_0"),
    "Q4_K_S": GGUFType(**K, fallback="Q5_0"), "Q4_K_M": GGUFType(**K, fallback="Q5_0"),
    "Q5_K_S": GGUFType(**K, fallback="Q5_1"), "Q5_K_M": GGUFType(**K, fallback="Q5_1"),
    "Q6_K": GGUFType(**K, fallback="Q8_0"),
    "IQ1_S": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ1_M": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ2_XXS": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ2_XS": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ2_S": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ2_M": GGUFType(**K, fallback="IQ4_NL", needs_imatrix=True),
    "IQ3_XXS": GGUFType(**K, fallback="IQ4_NL"), "IQ3_XS": GGUFType(**K, fallback="IQ4_NL"),
    "IQ3_S": GGUFType(**K, fallback="IQ4_NL"), "IQ3_M": GGUFType(**K, fallback="IQ4_NL"),
    "IQ4_XS": GGUFType(**K, fallback="IQ4_NL"),
    "IQ4_NL": GGUFType(32), "Q4_0": GGUFType(32), "Q4_1": GGUFType(32), "Q5_0": GGUFType(32),
    "Q5_1": GGUFType(32), "Q8_0": GGUFType(32),
    "F16": GGUFType(1), "BF16": GGUFType(1),
}
PRESET = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")     # the `gguf` release preset
IMATRIX = ("quantfarm", "llama", "none")                            # who makes the importance matrix
DEFAULT_TYPE = "Q4_K_M"


def gguf_type(name: str) -> GGUFType:
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise SpecError(f"unknown GGUF type {name!r}; llama-quantize types quantfarm offers: "
                        f"{', '.join(TYPES)}") from None


def problems(type_name: str, imatrix: str) -> list[str]:
    """Why llama-quantize would refuse these settings (empty: it will not)."""
    t = gguf_type(type_name)
    if t.needs_imatrix and imatrix == "none":
        return [f"GGUF {type_name.upper()} needs an importance matrix (llama-quantize refuses it without one): "
                "use --imatrix quantfarm or llama"]
    return []


def fallbacks(type_name: str, widths: dict[str, int]) -> dict[str, str]:
    """{weight kind: the ggml type llama-quantize gives it instead} for the kinds whose input width the
    type's block does not divide. `widths` maps a kind (e.g. `attn_q`) to its input width."""
    t = gguf_type(type_name)
    out = {}
    for kind, width in sorted(widths.items()):
        if width % t.block:
            fb = t.fallback or type_name.upper()
            out[kind] = fb if width % TYPES[fb].block == 0 else "F16"
    return out


def fallback_note(type_name: str, widths: dict[str, int]) -> str | None:
    fb = fallbacks(type_name, widths)
    if not fb:
        return None
    block = gguf_type(type_name).block
    parts = ", ".join(f"{k} ({widths[k]} wide) -> {v}" for k, v in fb.items())
    return (f"llama.cpp: {type_name.upper()} needs input widths divisible by {block}; these weights fall back "
            f"per tensor the way llama-quantize does: {parts}")


EXPERT = re.compile(r"\.experts\.\d+\.")


def name_map(arch: str, n_blocks: int):
    """checkpoint module name -> GGUF tensor name (without `.weight`), the converter's own table (gguf-py);
    an MoE expert's Linear maps to its layer's stacked experts tensor (`ffn_gate_exps`)."""
    import gguf
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise SpecError(f"gguf-py does not know the architecture {arch!r}")
    table = gguf.get_tensor_name_map(archs[arch], n_blocks)

    def to_gguf(module: str) -> str | None:
        return table.get_name(EXPERT.sub(".experts.", module)) or table.get_name(module)
    return to_gguf


def expert_index(module: str) -> int | None:
    m = EXPERT.search(module)
    return int(m.group(0).split(".")[2]) if m else None


def max_file_bytes(n_params: int) -> int:
    """An upper bound on a quantized file of n_params weights: Q8_0's 8.5 bits, rounded up to 9."""
    return n_params * 9 // 8


def file_summary(path) -> dict:
    """What a GGUF file holds, from its own header: metadata (tokenizer arrays left out), tensor count per
    ggml type (all tensors, and the decoder's weight matrices), bits per weight of both, and the fraction
    of the decoder's weights in a quantized type."""
    import gguf
    r = gguf.GGUFReader(str(path))
    meta = {k: v.contents() for k, v in r.fields.items()
            if not k.startswith("tokenizer.") and isinstance(v.contents(), (str, int, float))}
    lin = [x for x in r.tensors if x.name.startswith("blk.") and len(x.shape) >= 2]

    def count(ts):
        out: dict[str, int] = {}
        for x in ts:
            out[x.tensor_type.name] = out.get(x.tensor_type.name, 0) + 1
        return out

    def bpw(ts):
        return round(8 * sum(int(x.n_bytes) for x in ts) / max(sum(int(x.n_elements) for x in ts), 1), 3)
    lin_n = sum(int(x.n_elements) for x in lin)
    quantized = sum(int(x.n_elements) for x in lin if x.tensor_type.name not in ("F16", "F32", "BF16"))
    return {"meta": meta, "tensors": len(r.tensors), "types": count(r.tensors), "weight_types": count(lin),
            "bits_per_weight": {"quantized_linears": bpw(lin), "overall": bpw(r.tensors)},
            "fraction_quantized": round(quantized / max(lin_n, 1), 4)}


class GGUF(Format):
    """The table's entry: made by llama.cpp's tools (service/job/gguf_job.py), not packed by the walk.
    llama-quantize's type sets the bits and blocks and its own rounding quantizes, so the spec's weight
    settings are not used."""
    name, title, made_by = "gguf", "GGUF", "llama.cpp"
    knobs = {
        "gguf_type": (str | None, Field(None, max_length=16, description="format gguf: the llama-quantize type "
                                        f"({', '.join(TYPES)}); default {DEFAULT_TYPE}")),
        "imatrix": (Literal[IMATRIX], Field("quantfarm", description="format gguf: the importance matrix "
                                            "llama-quantize uses: quantfarm (from the calibration forward), llama "
                                            "(llama.cpp's llama-imatrix on the calibration text), none")),
        "gguf_shard": (str | None, Field(None, pattern=r"^[1-9][0-9]{0,5}[MG]$",
                                         description="format gguf: split files into parts of at most this size "
                                                     "(e.g. 4G) with llama-gguf-split; unset: files over 48 GB are "
                                                     "split at 48G (the Hub takes at most 50 GB a file)")),
    }
    ignores = ("algorithm", "scheme", "bits", "group_size", "sym", "act_order", "true_sequential", "damp_percent", "keep")
    why_ignored = "whose type (gguf_type, e.g. Q4_K_M) sets the bits and llama-quantize quantizes"

    def settle(self, values: dict) -> dict:
        t = (values.get("gguf_type") or DEFAULT_TYPE).upper()
        try:
            gguf_type(t)
            why = problems(t, values["imatrix"])
        except SpecError as e:
            raise ValueError(str(e)) from None
        if why:
            raise ValueError(why[0])
        return {**values, "gguf_type": t}

    def label(self, s) -> str:
        return f"gguf-{(s.gguf_type or DEFAULT_TYPE).lower()}"

    def recipe_fields(self, s) -> set[str]:
        return set() if self.needs_calibration(s, False) else {"calibration"}   # no matrix: nothing calibrated

    def needs_calibration(self, s, algorithm_needs_data: bool) -> bool:
        return s.imatrix != "none"

    def card_line(self, st: dict) -> str:
        im = {"quantfarm": "quantfarm's, from the calibration forward", "llama": "llama.cpp's llama-imatrix",
              "none": "none"}[st["imatrix"]]
        parts = [f"GGUF {st['gguf_type']} by llama-quantize ({st['llama_cpp']}), importance matrix {im}"]
        c = st.get("calibration")
        if c:
            parts.append(f"calibration {c['samples']} x {c['seq_len']} tokens of {c['source']} (seed {c['seed']}, "
                         f"hash {c['hash'][:12]})")
        if st.get("fallbacks"):
            parts.append("per-tensor fallbacks (widths the type's blocks do not divide): "
                         + ", ".join(f"{k} {n}x" for k, n in st["fallbacks"].items()))
        return "; ".join(parts)

    def summary_line(self, st: dict) -> str:
        return (f"gguf {st['gguf_type']} (llama-quantize, importance matrix {st['imatrix']}): "
                f"{', '.join(st['files'])}")

    def spec_line(self, s: dict) -> str:
        return f"GGUF {s['gguf_type']} (llama.cpp, imatrix {s['imatrix']})"

    def card_usage(self, st: dict, folder_name: str) -> list[str]:
        first = st["files"][0]
        return ["llama.cpp (and the runtimes built on it: Ollama, LM Studio):", "", "```sh",
                f"llama-completion -m {folder_name}/{first} -p \"The capital of France is\" -n 16 -no-cnv", "```", "",
                *(["transformers (with gguf installed; it dequantizes the weights to 16 bits):", "", "```python",
                   "from transformers import AutoModelForCausalLM, AutoTokenizer",
                   f"model_dir = \"{folder_name}\"  # this folder, or its Hub id once published",
                   "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
                   f"model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=\"{first}\")",
                   "inputs = tokenizer(\"The capital of France is\", return_tensors=\"pt\")",
                   "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=16)[0]))", "```", ""]
                  if len(st["files"]) == 1 else [])]

    def card_tags(self, s: dict) -> tuple[str, list[str]]:
        return "gguf", ["quantized", "gguf", s["gguf_type"], "llama.cpp",
                        *(["imatrix"] if s["imatrix"] != "none" else []), "quantfarm"]

    def size_words(self) -> tuple[str, str]:
        return "decoder weight matrices", "everything in the file"

    def artifact_files(self, path) -> list[Path] | None:
        path = Path(path)
        if path.suffix == ".gguf":
            return [path]
        files = sorted(p for p in path.glob("*.gguf") if p.name != "imatrix.gguf") if path.is_dir() else []
        return files if files and not (path / "config.json").is_file() else None

    def describe_files(self, files: list[Path]) -> dict:
        """A GGUF artifact (one file, or a folder of them: sizes or shards) from its own metadata and tensor types."""
        out = {"artifact": str(files[0].parent.resolve()), "format": self.name, "files": []}
        for f in files:
            s = file_summary(f)
            meta, arch = s["meta"], s["meta"].get("general.architecture")
            out["files"].append({
                "file": f.name, "bytes": f.stat().st_size, "architecture": arch, "name": meta.get("general.name"),
                "file_type": meta.get("general.file_type"), "layers": meta.get(f"{arch}.block_count"),
                "hidden_size": meta.get(f"{arch}.embedding_length"), "split": meta.get("split.count"),
                "tensors": s["tensors"], "types": s["types"], "bits_per_weight": s["bits_per_weight"]["overall"],
                "quantization_version": meta.get("general.quantization_version")})
        rep = files[0].parent / "report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            out["report"] = {"llama_cpp": r.get("llama_cpp"), "recovery": (r.get("evaluation") or {}).get("recovery"),
                             "settings": r.get("settings")}
        return out

    def render(self, d: dict) -> str:
        mb = 2 ** 20
        lines = [f"artifact     {d['artifact']}"]
        for f in d["files"]:
            lines += [f"file         {f['file']}: {f['bytes'] / mb:.1f} MiB, {f['bits_per_weight']:.2f} bits per weight, "
                      f"{f['tensors']} tensors" + (f" (one of {f['split']} shards)" if f.get("split") else ""),
                      f"model        {f['architecture']} ({f['name']}), {f['layers']} layers, hidden {f['hidden_size']}",
                      "types        " + ", ".join(f"{k} {n}" for k, n in sorted(f["types"].items(), key=lambda x: -x[1]))]
        lc = (d.get("report") or {}).get("llama_cpp")
        if lc:
            q = lc["quantized"]
            lines.append(f"llama.cpp    perplexity {q['perplexity']:.4f} (F16 {lc['fp16']['perplexity']:.4f}), "
                         f"KLD {q.get('kld', float('nan')):.5f}")
        return "\n".join(lines)

    def estimate_bytes(self, model, q) -> int:
        return max_file_bytes(sum(p.numel() for p in model.parameters()))

    def problems(self, q, shapes) -> list[str]:
        return []            # llama-quantize takes any shape: a block that does not divide falls back per tensor
