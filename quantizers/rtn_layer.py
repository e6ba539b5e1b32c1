"""Round-to-nearest's layer step: every Linear on its own, no calibration data."""
import torch

from . import rtn
from .config import QuantConfig
from .layers import StepOptions, is_kept, layer_linears, split_rows
from .scheme import ActOrder, Scheme

NEEDS_DATA = False
SYM_DEFAULT, SYM_FIXED = True, False
ACT_ORDER_DEFAULT = ActOrder.NONE
KNOBS: dict = {}


def problems(q: Scheme, shapes) -> list[str]:
    """Each weight rounds on its own: there is no column order to choose."""
    return ["act-order applies to GPTQ only"] if q.act_order != ActOrder.NONE else []


@torch.no_grad()
def quantize_layer(layer, hidden, kwargs, cfg: QuantConfig, opts: StepOptions):
    """RTN on one decoder layer in place; returns (results, info, None): no activations flow."""
    results, info = {}, {}
    for n, m in layer_linears(layer).items():
        if not is_kept(m):
            (results[n], info[n]), = split_rows([m], rtn.quantize_weight(m.weight.float(), cfg.scheme), {})
    return results, info, None
