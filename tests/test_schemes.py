"""The named-scheme table against compressed-tensors itself: each entry's weight and activation arguments are
that library's preset of the same name, and its layout is the format the library's compressors choose."""
import re

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


# ------------------------------------------------------------------------------------------------------
# A scheme in a job: JobSpec, the CLI and the recipe


def spec(**kw):
    from service.job.spec import JobSpec
    return JobSpec(model="smollm2-135m", **kw)


@pytest.mark.parametrize("name, algorithm, bits, group_size, sym, label", [
    ("W8A8", "gptq", 8, -1, True, "gptq-w8a8"),
    ("FP8_DYNAMIC", "rtn", 8, -1, True, "rtn-fp8-dynamic"),
    ("FP8", "rtn", 8, -1, True, "rtn-fp8"),
    ("W4A16", "gptq", 4, 128, True, "gptq-w4a16"),
    ("W4A16_ASYM", "gptq", 4, 128, False, "gptq-w4a16-asym"),
    ("W8A16", "gptq", 8, 128, True, "gptq-w8a16"),
])
def test_a_scheme_sets_the_grid_the_format_and_the_default_algorithm(name, algorithm, bits, group_size, sym, label):
    s = spec(scheme=name)
    assert (s.format, s.algorithm, s.bits, s.group_size, s.sym, s.label()) == \
        ("compressed-tensors", algorithm, bits, group_size, sym, label)
    q = s.quant_config().scheme
    assert q.named == name and q.activations == SCHEMES[name].activations
    assert q.weight_type == SCHEMES[name].weights.type
    assert s.recipe("r")["scheme"] == name and s.recipe_key("r") != spec(bits=bits, group_size=group_size, sym=sym,
                                                                         format="compressed-tensors",
                                                                         algorithm=algorithm).recipe_key("r")


def test_without_a_scheme_the_recipe_is_as_before():
    """Jobs made before schemes keep their keys: an unset scheme is not part of the recipe."""
    assert "scheme" not in spec().recipe("r") and "scheme" not in spec().quant_config().key()["scheme"]


@pytest.mark.parametrize("kw, message", [
    (dict(scheme="W8A8", bits=4), "scheme W8A8 fixes bits=8, group_size=-1, sym=True; bits=4 disagrees"),
    (dict(scheme="W8A8", group_size=128), "group_size=128 disagrees"),
    (dict(scheme="W4A16_ASYM", sym=True), "sym=True disagrees"),
    (dict(scheme="W8A8", format="gptq"), "scheme W8A8 is written as compressed-tensors int-quantized; gptq cannot"),
    (dict(scheme="NVFP4", format="gptq"), "nvfp4-pack-quantized; gptq cannot hold it"),
    (dict(scheme="W8A8", format="gguf"), "scheme, bits, group_size, sym: not used by format gguf"),
    (dict(scheme="FP8_DYNAMIC", algorithm="gptq"), "GPTQ onto float weights (FP8_DYNAMIC) is not implemented"),
    (dict(scheme="FP8_DYNAMIC", algorithm="awq"), "AWQ onto float weights"),
    (dict(scheme="W8A8", algorithm="awq"), "sym: AWQ quantizes with zero points"),
    (dict(scheme="FP8", algorithm="gptq"), "GPTQ onto float weights (FP8) is not implemented"),
    (dict(scheme="FP8_BLOCK"), "block FP8 weight scales are not implemented yet"),
    (dict(scheme="NVFP4"), "writing compressed-tensors nvfp4-pack-quantized is not implemented yet"),
    (dict(scheme="MXFP4"), "mxfp4-pack-quantized is not implemented yet"),
    (dict(scheme="W9A9"), "scheme"),
])
def test_a_scheme_the_job_cannot_make_is_refused_with_the_reason(kw, message):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match=re.escape(message)):
        spec(**kw)


def test_the_cli_passes_only_what_is_given():
    """`--scheme` alone: the scheme's grid and compressed-tensors, not the CLI's own defaults for bits or format."""
    import argparse

    from service.cli.args import spec_arguments, spec_from_args

    def parsed(*args):
        p = argparse.ArgumentParser()
        spec_arguments(p)
        return spec_from_args(p.parse_args(["smollm2-135m", *args]))
    s = parsed("--scheme", "W8A8")
    assert (s.scheme, s.format, s.bits, s.group_size) == ("W8A8", "compressed-tensors", 8, -1)
    plain = parsed()
    assert (plain.scheme, plain.format, plain.algorithm, plain.bits, plain.group_size) == (None, "gptq", "gptq", 4, 128)


def test_preflight_of_a_scheme_names_its_kernels():
    """The runtime verdicts an activation scheme gets (tests/test_vllm.py holds them against vLLM)."""
    from quantizers.formats import get
    from quantizers.formats.ct_layouts import FP8_CPU_KERNEL, INT8_CPU_KERNEL, INT8_GPU_KERNEL
    shapes = {(576, 576), (576, 1536), (1536, 576)}
    v = {x.runtime: x for x in get("compressed-tensors").runtimes(spec(scheme="W8A8").weight_scheme(), shapes, False)}
    assert (v["vllm"].kernel, v["vllm-cpu"].kernel) == (INT8_GPU_KERNEL, INT8_CPU_KERNEL)
    v = {x.runtime: x for x in get("compressed-tensors").runtimes(spec(scheme="FP8_DYNAMIC").weight_scheme(), shapes,
                                                                   True)}
    assert v["vllm-cpu"].kernel == FP8_CPU_KERNEL and any("AMX" in n for n in v["vllm-cpu"].notes)
    assert any("16-bit inputs" in n for n in v["transformers"].notes)


@pytest.mark.parametrize("value", [{}, [], 7, "w8a8"])
def test_a_scheme_that_is_no_name_is_refused_as_a_field_error(value):
    """What schemathesis found: a mapping where a name belongs reached the scheme lookup (HTTP 500)."""
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="scheme"):
        spec(scheme=value)
