"""GGUF, llama.cpp's single-file format, made by llama.cpp's own tools: its converter writes the F16 file
and `llama-quantize` the types below, with an importance matrix (imatrix.py) where given. Unlike the
other formats nothing here packs a Linear: this module knows what llama-quantize will do with each
weight's shape, so preflight can say it before any work, and how checkpoint names become GGUF names.

Block sizes and fallbacks are llama.cpp's (src/llama-quant.cpp, tensor_type_fallback): a weight whose
row length (input width) is not a multiple of its type's block takes a 32-block type instead, and F16
when even that does not divide it."""
import re
from dataclasses import dataclass

from core.errors import SpecError


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
