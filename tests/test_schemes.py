"""The named-scheme table against compressed-tensors itself: each entry's weight and activation arguments are
that library's preset of the same name, and its layout is the format the library's compressors choose."""
import pytest
import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

from quantizers.schemes import SCHEMES, Quant


def as_args(q: Quant | None) -> dict | None:
    """Our entry in QuantizationArgs' field names and values."""
    if q is None:
        return None
    return {"type": q.type, "num_bits": q.bits, "strategy": q.strategy, "group_size": q.group_size,
            "block_structure": list(q.block) if q.block else None, "symmetric": q.symmetric,
            "dynamic": q.dynamic, "scale_dtype": q.scale_dtype}


def plain(value):
    """An enum member as its value (the library stores some fields as enums, some as their values)."""
    return getattr(value, "value", value)


def library_args(args) -> dict | None:
    if args is None:
        return None
    scale = args.scale_dtype
    return {"type": plain(args.type), "num_bits": args.num_bits, "strategy": plain(args.strategy),
            "group_size": args.group_size, "block_structure": args.block_structure, "symmetric": args.symmetric,
            "dynamic": plain(args.dynamic), "scale_dtype": None if scale is None else str(scale).removeprefix("torch.")}


def test_the_issue_names_every_scheme_and_nothing_else():
    assert set(SCHEMES) == {"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4",
                            "NVFP4A16", "MXFP4"}
    assert all(name == s.name for name, s in SCHEMES.items())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_each_scheme_is_compressed_tensors_preset(name):
    ours, preset = SCHEMES[name], PRESET_SCHEMES[name]
    assert as_args(ours.weights) == library_args(preset["weights"])
    assert as_args(ours.activations) == library_args(preset.get("input_activations"))
    scheme = QuantizationScheme(targets=["Linear"], **preset)
    assert infer_module_format(torch.nn.Linear, scheme).value == ours.layout


def test_the_check_sees_a_difference():
    """The comparison is not vacuous: a changed group size or dynamic flag no longer matches the preset."""
    w8a8 = SCHEMES["W8A8"]
    assert as_args(Quant("int", 8, "group", 128)) != library_args(PRESET_SCHEMES["W8A8"]["weights"])
    assert as_args(Quant("int", 8, "token")) != library_args(PRESET_SCHEMES["W8A8"]["input_activations"])
    assert as_args(w8a8.activations) == library_args(PRESET_SCHEMES["W8A8"]["input_activations"])
