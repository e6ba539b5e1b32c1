"""W8A8 and FP8_DYNAMIC artifacts (compressed-tensors `int-quantized` and `float-quantized`) against readers
that are not ours: a reader written here from compressed-tensors' description of those layouts (one byte per
weight, [out, in]; weight_scale [out, 1] in the model dtype; W = weight * weight_scale; input_activations in
the config), compressed-tensors' own decompressor through transformers, and transformers running the scheme
with its own activation rounding. vLLM's reading is tests/test_vllm.py's."""
import json

import pytest
import torch
from safetensors import safe_open

import tiny
from quantizers import activations, rtn
from quantizers.artifact import DequantLinear, load_artifact, save, with_scale_dtype
from quantizers.config import QuantConfig
from quantizers.grid import FP8, FP8_MAX
from quantizers.scheme import Scheme
from quantizers.walk import quantize_model

MADE = {"W8A8": ("int-quantized", torch.int8), "FP8_DYNAMIC": ("float-quantized", torch.float8_e4m3fn),
        "FP8": ("float-quantized", torch.float8_e4m3fn)}
PROMPTS = tiny.calib(2, 24, seed=5)


def build(folder, name: str, algorithm: str = "rtn", arch: str = "llama"):
    """(artifact, the model before quantization): tiny bf16-declared model, every decoder Linear quantized."""
    import copy
    model = tiny.tiny_moe(arch) if arch in tiny.MOE_ARCHS else tiny.tiny_model(arch)
    model.config.dtype = torch.bfloat16                 # scales in bfloat16, as SmolLM2's artifacts have them
    original = copy.deepcopy(model)
    cfg = with_scale_dtype(QuantConfig(scheme=Scheme(8, -1, True, named=name), algorithm=algorithm),
                           "compressed-tensors", model)
    q, _ = quantize_model(model, tiny.calib(8, 32) if algorithm != "rtn" or cfg.scheme.static_inputs else None, cfg)
    return save(folder, model, None, q, cfg, "compressed-tensors", {"algorithm": algorithm}), original


def documented_read(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(quantization_config, {module: dequantized weight}) read as compressed-tensors documents the layouts:
    weight_scale [out, 1] per channel or [1] per tensor; a static scheme's input_scale [1] beside it."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    per_tensor, static = group["weights"]["strategy"] == "tensor", group["input_activations"]["dynamic"] is False
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            if k.endswith(".weight_scale"):
                m = k[:-len(".weight_scale")]
                w, s = f.get_tensor(f"{m}.weight"), f.get_tensor(k)
                assert s.shape == ((1,) if per_tensor else (w.shape[0], 1)) and s.dtype == torch.bfloat16, (m, s.shape)
                assert (f"{m}.input_scale" in f.keys()) == static
                if static:
                    i = f.get_tensor(f"{m}.input_scale")
                    assert i.shape == (1,) and i.dtype == torch.bfloat16 and i.item() > 0
                out[m] = w.float() * s.float()
    return qc, out


def linears_of(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DequantLinear)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPTS).logits.float()


@pytest.mark.parametrize("name", sorted(MADE))
def test_the_documented_layout_reads_back_our_weights(tmp_path, name):
    layout, dtype = MADE[name]
    folder, original = build(tmp_path / "a", name)
    qc, read = documented_read(folder)
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == layout and qc["quant_method"] == "compressed-tensors"
    assert group["weights"]["strategy"] == ("tensor" if name == "FP8" else "channel") and group["weights"]["num_bits"] == 8
    static = name == "FP8"                 # per-tensor weights, inputs at a scale calibration fixed
    assert group["input_activations"]["strategy"] == ("tensor" if static else "token")
    assert group["input_activations"]["dynamic"] is (not static)
    assert group["input_activations"]["type"] == group["weights"]["type"] == ("int" if dtype == torch.int8 else "float")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(f"{m}.weight").dtype for m in read} == {dtype}
    ours = {n: m.weight for n, m in linears_of(load_artifact(folder, with_tokenizer=False)[0]).items()}
    assert set(read) == set(ours) and len(ours) == 14                  # 7 Linears in each of the 2 layers
    for m, W in read.items():
        assert torch.equal(W, ours[m]), m
        W0 = original.get_submodule(m).weight.float()
        step = (W0.abs().amax() if name == "FP8" else W0.abs().amax(1, keepdim=True)) / \
            (127.5 if dtype == torch.int8 else FP8_MAX)
        # int8: half a step, up to a whole one at a row's largest weight (the grid's top code is 127, not 127.5, and
        # the scale is rounded to bfloat16); E4M3: 3 mantissa bits, half an ulp is 1/16 of the value
        bound = step if dtype == torch.int8 else W0.abs() / 16 + step * 2 ** -9
        assert ((W - W0).abs() <= bound * 1.01 + 1e-7).all(), (m, ((W - W0).abs() - bound).max())


@pytest.mark.parametrize("name", sorted(MADE))
def test_compressed_tensors_decompresses_the_weights_we_evaluate(tmp_path, name):
    """compressed-tensors' own decompressor (transformers, run_compressed=False) gives our weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    folder, _ = build(tmp_path / "a", name, algorithm="gptq" if name == "W8A8" else "rtn")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    for n, m in linears_of(load_artifact(folder, with_tokenizer=False)[0]).items():
        W = theirs.get_submodule(n).weight.float()
        # decompressed in the scale's dtype (bfloat16), ours in float32 from the same integers and scale
        assert torch.equal(W, m.weight.to(torch.bfloat16).float()) or torch.allclose(W, m.weight, rtol=2 ** -8), n


@pytest.mark.parametrize("name", sorted(MADE))
def test_transformers_runs_the_scheme_as_our_reader(tmp_path, name, monkeypatch):
    """transformers with compressed-tensors (its compressed path, which rounds each Linear's inputs as the
    config says) gives our reader's logits: exactly for FP8; for int8 once our rounding takes compressed-tensors'
    divisor (absmax / 127.5; ours is vLLM's absmax / 127, which tests/test_vllm.py holds against vLLM)."""
    from transformers import AutoModelForCausalLM
    folder, _ = build(tmp_path / "a", name)
    theirs = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    ours_model = load_artifact(folder, with_tokenizer=False)[0]
    vllm_rounding = logits(ours_model)
    monkeypatch.setattr(activations, "INT8_DIVISOR", 127.5)
    assert torch.allclose(logits(ours_model), theirs, atol=1e-4), (logits(ours_model) - theirs).abs().max()
    if name == "W8A8":      # the divisor matters: the comparison sees it
        assert not torch.allclose(vllm_rounding, theirs, atol=1e-4)
    for m in linears_of(ours_model).values():     # and so do the activations: weights alone are not the scheme
        m.inputs = None
    assert not torch.allclose(logits(ours_model), theirs, atol=1e-3)


def test_moe_experts_take_the_scheme(tmp_path):
    """A tiny Qwen3-MoE in FP8_DYNAMIC: every expert's Linears FP8 with their scales, routers 16-bit and declared
    ignored, and transformers (fused experts filled from the per-expert tensors) gives our logits once the experts'
    inputs stay 16-bit: its fused experts are no Linear modules, so compressed-tensors rounds no input there."""
    from transformers import AutoModelForCausalLM
    folder, _ = build(tmp_path / "a", "FP8_DYNAMIC", arch="qwen3_moe")
    qc, read = documented_read(folder)
    experts = [m for m in read if ".experts." in m]
    assert experts and all(m.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for m in experts)
    assert any(i.endswith("mlp.gate") for i in qc["ignore"])
    theirs = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    model = load_artifact(folder, with_tokenizer=False)[0]
    served = logits(model)
    for n, m in linears_of(model).items():
        if ".experts." in n:
            m.inputs = None
    ours = logits(model)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert not torch.allclose(served, theirs, atol=1e-3)


def test_fp8_grid():
    """RTN onto E4M3 per output channel: each row's largest weight becomes 448 x its scale, every code is an E4M3
    value, and the scale is the bfloat16 the artifact stores."""
    W = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    qw = rtn.quantize_weight(W, Scheme(8, -1, True, scale_dtype="bfloat16", named="FP8_DYNAMIC"))
    assert qw.codes.dtype == FP8 and qw.scales.shape == (1, 16)
    assert torch.equal(qw.scales, qw.scales.to(torch.bfloat16).float())
    assert (qw.codes.float().abs().amax(1) - FP8_MAX).abs().max() <= 32         # 448 or its neighbour 416/480 clamp
    assert torch.equal(qw.codes.float().to(FP8).float(), qw.codes.float())
    assert ((qw.dequantize() - W).abs() <= W.abs() / 16 + qw.scales.t() * 2 ** -9).all()


def test_activation_rounding_is_vllms():
    """Per token: int8 with absmax / 127 (vLLM's scaled_int8_quant; checked against vLLM's op by test_vllm's
    logits), FP8 with absmax / 448."""
    from quantizers.schemes import SCHEMES
    x = torch.randn(3, 5, 64)
    q = activations.fake_quantize(x, SCHEMES["W8A8"].activations)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(q / s, torch.round(q / s), atol=1e-3) and torch.allclose(q.abs().amax(-1), x.abs().amax(-1))
    f = activations.fake_quantize(x, SCHEMES["FP8_DYNAMIC"].activations)
    assert torch.allclose(f.abs().amax(-1), x.abs().amax(-1)) and not torch.equal(f, x)
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        activations.fake_quantize(x, SCHEMES["NVFP4"].activations)


def test_fp8_resume_state_round_trips(tmp_path):
    """The walk's resume state keeps FP8 codes as FP8: a run that resumes after every layer gives the same codes."""
    from quantizers.walk import Cancelled
    cfg = QuantConfig(scheme=Scheme(8, -1, True, named="FP8_DYNAMIC"), algorithm="rtn")
    whole, _ = quantize_model(tiny.tiny_model("llama"), None, cfg)
    calls = iter([False, True])
    with pytest.raises(Cancelled):              # stopped after layer 0, its state on disk
        quantize_model(tiny.tiny_model("llama"), None, cfg, state_dir=tmp_path, should_stop=lambda: next(calls))
    resumed, _ = quantize_model(tiny.tiny_model("llama"), None, cfg, state_dir=tmp_path)
    assert set(resumed) == set(whole)
    for n, qw in whole.items():
        assert resumed[n].codes.dtype == FP8 and torch.equal(resumed[n].codes.float(), qw.codes.float()), n
