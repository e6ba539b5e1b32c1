"""Round-to-nearest's layer step: every Linear on its own, no calibration data."""
import torch

from . import rtn
from .config import QuantConfig
from .layers import StepOptions, is_kept, layer_linears, split_rows
from .scheme import Scheme

NEEDS_DATA = False


def problems(q: Scheme, shapes) -> list[str]:
    return []


@torch.no_grad()
def quantize_layer(layer, hidden, kwargs, cfg: QuantConfig, opts: StepOptions):
    """RTN on one decoder layer in place; returns (results, info, None): no activations flow."""
    results, info = {}, {}
    for n, m in layer_linears(layer).items():
        if not is_kept(m):
            (results[n], info[n]), = split_rows([m], rtn.quantize_weight(m.weight.float(), cfg.scheme), {})
    return results, info, None
