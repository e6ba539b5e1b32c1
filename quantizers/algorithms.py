"""The table of algorithms. Each is a module with its layer step beside its math: NEEDS_DATA (whether
it calibrates), problems(scheme, shapes) (settings it cannot run with) and quantize_layer (one decoder
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
