"""The weight scheme: what grid a weight matrix is quantized onto, one frozen object shared by the
algorithms, the format writers and preflight (llm-compressor's QuantizationArgs plays this part)."""
from dataclasses import dataclass, replace
from enum import Enum

import torch

from .schemes import SCHEMES, NamedScheme, Quant


class ActOrder(str, Enum):
    """Column order of GPTQ. none: natural; static: columns by descending diag(H), groups in natural
    order (g_idx = c // group_size, free at inference); dynamic: groups formed in Hessian order
    (non-monotonic g_idx, which a loader must gather per input channel)."""
    NONE = "none"
    STATIC = "static"
    DYNAMIC = "dynamic"

    @classmethod
    def of(cls, desc_act: bool, static_groups: bool) -> "ActOrder":
        """From GPTQ's two historical flags (quantize_config.json, JobSpec)."""
        return cls.NONE if not desc_act else (cls.STATIC if static_groups else cls.DYNAMIC)


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128            # columns per group; -1: one group per row
    sym: bool = True                 # symmetric grid (zero at the middle code) or zero points
    act_order: ActOrder = ActOrder.NONE
    scale_dtype: str = "float16"     # dtype the artifact stores scales in: grids round to it before choosing codes
    named: str | None = None         # a named scheme of schemes.SCHEMES (W8A8, FP8_DYNAMIC, ...): its weight type,
                                     # its activations and its compressed-tensors layout (None: an integer grid, 16-bit
                                     # activations, as bits/group_size/sym say)

    def __post_init__(self):
        object.__setattr__(self, "act_order", ActOrder(self.act_order))

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    @property
    def desc_act(self) -> bool:
        return self.act_order != ActOrder.NONE

    @property
    def static_groups(self) -> bool:
        return self.act_order == ActOrder.STATIC

    @property
    def monotonic(self) -> bool:
        """g_idx never decreases: every layout without a g_idx of its own can hold it."""
        return self.act_order != ActOrder.DYNAMIC or self.group_size == -1

    @property
    def preset(self) -> NamedScheme | None:
        return SCHEMES[self.named] if self.named else None

    @property
    def weight_type(self) -> str:
        """int (codes on an integer grid) | float (FP8 E4M3 values times a scale)."""
        return self.preset.weights.type if self.preset else "int"

    @property
    def activations(self) -> Quant | None:
        """How the inputs of each quantized Linear are quantized when it runs (None: they stay 16-bit)."""
        return self.preset.activations if self.preset else None

    @property
    def per_tensor(self) -> bool:
        """One weight scale per matrix (FP8 static) rather than per row or group."""
        return bool(self.preset) and self.preset.weights.strategy == "tensor"

    @property
    def static_inputs(self) -> bool:
        """Input scales fixed from calibration: the walk observes each Linear's inputs."""
        return self.activations is not None and self.activations.dynamic is False

    def replace(self, **changes) -> "Scheme":
        return replace(self, **changes)

    def ragged_widths(self, shapes) -> list[int]:
        """Input widths of (in, out) shapes that leave a ragged last group."""
        return sorted({i for i, _ in shapes if self.group_size != -1 and i % self.group_size})

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "act_order": self.act_order.value,
                "scale_dtype": self.scale_dtype, **({"scheme": self.named} if self.named else {})}
