"""Preflight: before any GPU time, can these settings be written for this model's Linear shapes,
and which runtime paths will load the result (FORMATS.md lists the constraints)?

Unwritable combinations are refused with every reason at once; runtime verdicts are advice
(reported by the job, `quantize` and `inspect`), since an artifact may be meant for one runtime only.
"""
from dataclasses import asdict, dataclass, field

from quantizers import awq_format, ct_format, gptq_format

from .errors import SpecError

MARLIN_GROUPS = (-1, 32, 64, 128)


@dataclass(frozen=True)
class Settings:
    format: str             # gptq | awq | compressed-tensors
    algorithm: str          # gptq | awq | rtn
    bits: int
    group_size: int
    sym: bool
    act_order: str = "none"  # none | static | dynamic


@dataclass
class Verdict:
    runtime: str
    ok: bool
    path: str               # the kernel or loader that takes it
    notes: list[str] = field(default_factory=list)


def problems(s: Settings, shapes: set[tuple[int, int]]) -> list[str]:
    """Why these settings cannot be written for Linears of these (in, out) shapes (empty: they can)."""
    out = []
    if s.algorithm == "awq" and s.act_order != "none":
        out.append("act-order applies to GPTQ only")
    if s.algorithm == "awq" and s.group_size != -1 and any(i % s.group_size for i, _ in shapes):
        out.append(f"AWQ needs every input width to be a multiple of the group size (widths "
                   f"{_widths(shapes, s.group_size)} are not multiples of {s.group_size}; try 64 or 32)")
    monotonic = s.act_order != "dynamic"
    for i, o in sorted(shapes):
        try:
            if s.format == "gptq":
                gptq_format.check_writable(s.bits, i, o)
            elif s.format == "awq":
                awq_format.check_writable(s.bits, s.group_size, i, o, monotonic)
            elif s.format == "compressed-tensors":
                ct_format.check_writable(s.bits, s.group_size, i, monotonic)
            else:
                out.append(f"unknown format {s.format!r}")
        except SpecError as e:
            if str(e) not in out:
                out.append(str(e))
    return out


def refuse_unwritable(checks: dict):
    """Raise with every reason when `report(...)` found the settings unwritable."""
    if not checks["writable"]:
        s = checks["settings"]
        raise SpecError(f"cannot write {s['algorithm']} results as {s['format']} {s['bits']}-bit g{s['group_size']}: "
                        + "; ".join(checks["problems"]))


def _widths(shapes, gs) -> list[int]:
    return sorted({i for i, _ in shapes if gs != -1 and i % gs})


def _marlin_notes(s: Settings, shapes) -> list[str]:
    """What keeps vLLM's Marlin kernels (gptq_marlin, awq_marlin, compressed-tensors WNA16) off."""
    notes = []
    if s.bits not in (4, 8) or (s.format == "awq" and s.bits != 4):
        notes.append(f"{s.bits}-bit has no Marlin kernel")
    if s.group_size not in MARLIN_GROUPS:
        notes.append(f"group size {s.group_size} is not one of {MARLIN_GROUPS}")
    bad_out = sorted({o for _, o in shapes if o % 64})
    bad_in = sorted({i for i, _ in shapes if i % 128})
    if bad_out:
        notes.append(f"out_features {bad_out} are not multiples of 64")
    if bad_in:
        notes.append(f"in_features {bad_in} are not multiples of 128")
    if _widths(shapes, s.group_size):
        notes.append(f"in_features {_widths(shapes, s.group_size)} are not multiples of group size {s.group_size}")
    return notes


def runtimes(s: Settings, shapes: set[tuple[int, int]]) -> list[Verdict]:
    """Which path vLLM and transformers take for an artifact with these settings and shapes."""
    marlin = _marlin_notes(s, shapes)
    if s.format == "gptq":
        if not s.sym:
            vllm = Verdict("vllm", False, "none", ["vLLM's GPTQ kernels read v1 zero points; asymmetric weights are "
                                                   "written as gptq_v2, so use --format compressed-tensors or awq"])
        elif marlin:
            vllm = Verdict("vllm", True, "gptq (slower fallback kernel)", marlin)
        else:
            vllm = Verdict("vllm", True, "gptq_marlin")
        tf_notes = []
        if _widths(shapes, s.group_size):
            tf_notes.append("a ragged last group runs only with GPTQConfig(backend='torch')")
        tf = Verdict("transformers", True, "gptqmodel", tf_notes)
    elif s.format == "awq":
        vllm = Verdict("vllm", True, "awq (slower GEMM kernel)", marlin) if marlin else Verdict("vllm", True, "awq_marlin")
        tf = Verdict("transformers", True, "gptqmodel (AWQ GEMM)",
                     [] if s.group_size in (32, 64, 128, 256) else
                     [f"gptqmodel's CPU AWQ kernel takes group sizes 32, 64, 128 or 256, not {s.group_size}"])
    else:
        notes = marlin + ([] if s.sym else ["asymmetric weights need a vLLM whose WNA16 Marlin path takes zero points"])
        vllm = Verdict("vllm", not marlin, "compressed-tensors WNA16 (Marlin)" if not marlin else "none", notes)
        tf = Verdict("transformers", True, "compressed-tensors")
    return [vllm, tf]


def report(s: Settings, shapes: set[tuple[int, int]]) -> dict:
    p = problems(s, shapes)
    return {"settings": asdict(s), "writable": not p, "problems": p,
            "runtimes": [asdict(v) for v in runtimes(s, shapes)]}


def model_shapes(model) -> set[tuple[int, int]]:
    """(in, out) of every Linear the driver quantizes."""
    import torch

    from quantizers.driver import decoder_layers
    return {(m.in_features, m.out_features) for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)}
