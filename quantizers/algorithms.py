"""The table of algorithms. Each is a module with its layer step beside its math, declaring what JobSpec
and preflight ask of it: NEEDS_DATA (whether it calibrates), SYM_DEFAULT / SYM_FIXED (its grid's symmetry
when unset, and whether that is the only one it runs), ACT_ORDER_DEFAULT, KNOBS (its own settings, as
JobSpec fields), problems(scheme, shapes) (settings it cannot run with) and quantize_layer (one decoder
layer in place). Adding an algorithm = its math module, its layer step, one line here."""
from core.errors import SpecError

from . import awq_layer, gptq_layer, rtn_layer

ALGORITHMS = {
    "gptq": gptq_layer,
    "awq": awq_layer,
    "rtn": rtn_layer,
}


def algorithm(name: str):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise SpecError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None
