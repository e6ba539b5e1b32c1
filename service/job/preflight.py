"""Preflight: before any GPU time, can these settings be written for this model's Linear shapes,
and which runtime paths will load the result (../shared/FORMATS.md lists the constraints)?

Unwritable combinations are refused with every reason at once; runtime verdicts are advice
(reported by the job, `quantize` and `inspect`), since an artifact may be meant for one runtime only.
Both questions go to the tables: the algorithm says what it cannot run with, the format what it cannot
hold and which runtime paths take it (quantizers/formats/vllm.py holds vLLM's rules).
"""
from dataclasses import asdict, dataclass

from core.errors import SpecError
from quantizers import formats
from quantizers.algorithms import ALGORITHMS
from quantizers.formats import Verdict
from quantizers.scheme import Scheme


@dataclass(frozen=True)
class Target:
    """What an artifact is to be (or is): its format, the algorithm that made it, its grid."""
    format: str
    algorithm: str
    scheme: Scheme
    moe: bool = False        # the model has mixture-of-experts layers (per-expert weights)

    @classmethod
    def of(cls, spec, model) -> "Target":
        """What a job of `spec` makes of `model` (loaded, or built from its config on the meta device)."""
        return cls(spec.format, spec.algorithm, spec.weight_scheme(), is_moe(model))

    def as_dict(self) -> dict:
        """The flat form reports, `inspect` and the API show."""
        s = self.scheme
        return {"format": self.format, "algorithm": self.algorithm, "bits": s.bits, "group_size": s.group_size,
                "sym": s.sym, "act_order": s.act_order.value, "moe": self.moe,
                **({"scheme": s.named} if s.named else {})}


def problems(t: Target, shapes: set[tuple[int, int]]) -> list[str]:
    """Why these settings cannot be written for Linears of these (in, out) shapes (empty: they can)."""
    alg = ALGORITHMS.get(t.algorithm)          # an artifact of another writer may name none we know
    out = alg.problems(t.scheme, shapes) if alg else []
    return out + [p for p in formats.get(t.format).problems(t.scheme, shapes) if p not in out]


def refuse_unwritable(checks: dict):
    """Raise with every reason when `report(...)` found the settings unwritable."""
    if not checks["writable"]:
        s = checks["settings"]
        raise SpecError(f"cannot write {s['algorithm']} results as {s['format']} {s['bits']}-bit g{s['group_size']}: "
                        + "; ".join(checks["problems"]))


def runtimes(t: Target, shapes: set[tuple[int, int]]) -> list[Verdict]:
    """Which path vLLM (on a GPU, and on a CPU) and transformers take for an artifact with these settings
    and Linear shapes, or why they refuse it."""
    return formats.get(t.format).runtimes(t.scheme, shapes, t.moe)


def report(t: Target, shapes: set[tuple[int, int]]) -> dict:
    p = problems(t, shapes)
    return {"settings": t.as_dict(), "writable": not p, "problems": p,
            "runtimes": [asdict(v) for v in runtimes(t, shapes)]}


def runtime_line(v: dict) -> str:
    """One line per runtime for summaries: the path it takes, or that it refuses and why."""
    if v["ok"]:
        return v["path"]
    return "refuses it: " + (v["notes"][0].split("refuses: ", 1)[-1] if v["notes"] else v["reason"])


def runtime_notes(v: dict) -> list[str]:
    """The notes below that line: a refusal's first note is the line itself."""
    return v["notes"][0 if v["ok"] else 1:]


def coverage_line(fraction: float, *extras: str) -> str:
    """How much of the decoder layers' weights is quantized, as `quantize` and `inspect` print it."""
    return f"{100 * fraction:.1f}% of the decoder layers' weight matrices quantized" + "".join(extras)


def is_moe(model) -> bool:
    """Per-expert weights: unfused expert Linears (names with .experts.N.) or fused experts modules."""
    from quantizers.moe import has_experts, is_fused_experts
    return has_experts(n for n, _ in model.named_modules()) or any(is_fused_experts(m) for m in model.modules())


def model_shapes(model) -> set[tuple[int, int]]:
    """(in, out) of every weight matrix the walk quantizes (MoE experts included, routers not)."""
    from quantizers.layers import decoder_layers
    from quantizers.moe import linear_shapes
    return linear_shapes(decoder_layers(model))
