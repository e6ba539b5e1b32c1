"""The named schemes teams ask for by hardware (llm-compressor's preset names: W4A16, W8A8, FP8_DYNAMIC,
NVFP4, ...), as data: what a Linear's weight and its input activations become, and which compressed-tensors
layout holds the result. One table: code reads an entry's fields, never its name.

The fields are compressed-tensors' QuantizationArgs terms, so a checkpoint's quantization_config is these
entries written out; tests/test_schemes.py holds every entry against compressed-tensors' own presets and the
format its compressors choose for them. What each is for follows llm-compressor's hardware guide.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Quant:
    """How one tensor is quantized. `strategy`: tensor | channel | group | block | token | tensor_group (NVFP4:
    groups with a per-tensor global scale); `group_size` for group strategies, `block` (rows, columns) for block;
    `dynamic`: scales computed at run time (True), per group at run time under a static global scale ("local"),
    or fixed from calibration (False); `scale_dtype`: the scales' own type when it is not the model's
    (float8_e4m3fn for NVFP4, uint8 E8M0 exponents for MX)."""
    type: str                       # int | float
    bits: int
    strategy: str
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    dynamic: bool | str = False
    scale_dtype: str | None = None

    def words(self) -> str:
        """'int8 per channel', 'FP4 in groups of 16 with a global scale', as the model card says it."""
        kind = f"int{self.bits}" if self.type == "int" else f"FP{self.bits}"
        where = {"channel": "per channel", "tensor": "per tensor", "token": "per token",
                 "group": f"in groups of {self.group_size}",
                 "block": f"in {'x'.join(map(str, self.block or ()))} blocks",
                 "tensor_group": f"in groups of {self.group_size} with a per-tensor global scale"}[self.strategy]
        return f"{kind} {where}" + ("" if self.symmetric else " with zero points")

    def args(self) -> dict:
        """As a compressed-tensors QuantizationArgs entry of a checkpoint's quantization_config."""
        return {"num_bits": self.bits, "type": self.type, "symmetric": self.symmetric, "strategy": self.strategy,
                "group_size": self.group_size, "block_structure": list(self.block) if self.block else None,
                "dynamic": self.dynamic, "actorder": None, "observer": None if self.dynamic is True else "minmax",
                **({"scale_dtype": self.scale_dtype} if self.scale_dtype else {})}

    @classmethod
    def of_args(cls, a: dict | None) -> "Quant | None":
        """A QuantizationArgs entry read back (None stays None)."""
        if a is None:
            return None
        block = a.get("block_structure")
        return cls(a.get("type", "int"), a["num_bits"], a.get("strategy") or "tensor", a.get("group_size"),
                   tuple(block) if block else None, a.get("symmetric", True), a.get("dynamic", False),
                   a.get("scale_dtype"))


@dataclass(frozen=True)
class NamedScheme:
    name: str
    weights: Quant
    activations: Quant | None       # None: weight-only (activations stay 16-bit)
    layout: str                     # the compressed-tensors format that stores it
    hardware: str                   # what it is made for, as llm-compressor's guide says (not a runtime check)

    def words(self) -> str:
        """'W8A8: weights int8 per channel, activations int8 per token (at run time)'."""
        a = self.activations
        acts = "activations 16-bit" if a is None else \
            f"activations {a.words()} ({'at run time' if a.dynamic is True else 'scales from calibration'})"
        return f"{self.name}: weights {self.weights.words()}, {acts}"


def named(weights: Quant, activations: Quant | None, layout: str) -> str | None:
    """The table's name for what a checkpoint holds (None: no entry is exactly that)."""
    return next((s.name for s in SCHEMES.values()
                 if (s.weights, s.activations, s.layout) == (weights, activations, layout)), None)


_NVFP4 = Quant("float", 4, "tensor_group", 16, scale_dtype="float8_e4m3fn")

SCHEMES = {s.name: s for s in (
    NamedScheme("W4A16", Quant("int", 4, "group", 128), None, "pack-quantized", "Ampere GPUs"),
    NamedScheme("W4A16_ASYM", Quant("int", 4, "group", 128, symmetric=False), None, "pack-quantized",
                "Ampere GPUs"),
    NamedScheme("W8A16", Quant("int", 8, "group", 128), None, "pack-quantized", "Ampere GPUs"),
    NamedScheme("W8A8", Quant("int", 8, "channel"), Quant("int", 8, "token", dynamic=True), "int-quantized",
                "CPUs and older GPUs (INT8)"),
    NamedScheme("FP8", Quant("float", 8, "tensor"), Quant("float", 8, "tensor"), "float-quantized",
                "Hopper GPUs (FP8)"),
    NamedScheme("FP8_DYNAMIC", Quant("float", 8, "channel"), Quant("float", 8, "token", dynamic=True), "float-quantized",
                "Hopper GPUs (FP8)"),
    NamedScheme("FP8_BLOCK", Quant("float", 8, "block", block=(128, 128)),
                Quant("float", 8, "group", 128, dynamic=True), "float-quantized",
                "Hopper GPUs (FP8, DeepSeek-style blocks)"),
    NamedScheme("NVFP4", _NVFP4, Quant("float", 4, "tensor_group", 16, dynamic="local", scale_dtype="float8_e4m3fn"),
                "nvfp4-pack-quantized", "Blackwell GPUs (FP4)"),
    NamedScheme("NVFP4A16", _NVFP4, None, "nvfp4-pack-quantized", "Blackwell GPUs (FP4 weights)"),
    NamedScheme("MXFP4", Quant("float", 4, "group", 32, scale_dtype="uint8"), Quant("float", 4, "group", 32, dynamic=True, scale_dtype="uint8"),
                "mxfp4-pack-quantized", "Blackwell GPUs (MX FP4)"),
)}
