"""The layer-by-layer driver on tiny random models of each supported architecture: what it quantizes,
what the model becomes, how close it stays, the artifact it makes, grouping, determinism, resume,
RTN through the driver and asymmetric (gptq_v2) round trips."""
import copy
import json

import pytest
import torch
from torch import nn

from quantizers import formats, gptq, rtn
from quantizers.artifact import DequantLinear, load_artifact, write_artifact
from quantizers.config import QuantConfig
from quantizers.layers import capture_layer_inputs, decoder_layers, input_groups
from quantizers.walk import Cancelled, quantize_model
from quantizers.formats.gptq import GPTQ
from quantizers.scheme import Scheme
from core.errors import QuantizationError, SpecError
from tiny import ARCHS, calib, tiny_model

# Logits of the 4-bit g32 model against the float model, ||q - f|| / ||f|| on the calibration tokens.
# Measured here: 0.061-0.068 for llama/mistral/qwen2/phi3, 0.012 for gemma (its sqrt(hidden)-scaled
# embeddings dominate the residual stream). That is what 4-bit grids predict: on Gaussian weights a
# 32-wide symmetric group has absmax ~2.1 sigma, step ~0.28 sigma, rounding noise step/sqrt(12) ~0.08
# sigma, i.e. ~8% relative error per Linear before GPTQ's compensation. 0.15 leaves ~2x headroom for
# seeds and library versions while still failing on a real fault (a wrong scale, a lost bias, a
# transposed or mis-split q/k/v gives errors of order 1).
LOGIT_REL_BOUND = 0.15

FOUR_BIT = Scheme(bits=4, group_size=32)


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def decoder_linear_names(model) -> set[str]:
    """Full names of every nn.Linear inside the decoder layers."""
    layers = decoder_layers(model)
    ids = {id(l) for l in layers}
    prefixes = [n for n, m in model.named_modules() if id(m) in ids]
    return {f"{p}.{n}" for p in prefixes for n, m in model.get_submodule(p).named_modules()
            if isinstance(m, nn.Linear)}


def quant_config_dict(cfg: QuantConfig) -> dict:
    algorithm = {"true_sequential": cfg.true_sequential, "damp_percent": cfg.damp_percent}
    return formats.get("gptq").config(cfg.scheme, algorithm, meta={"test": True})[0]


def rounded_to_fp16(model, quantized) -> nn.Module:
    """A copy of `model` whose unquantized tensors are rounded to float16 (and kept in float32): what
    the artifact stores for them. The quantized Linears' weights are left as they are: the artifact
    holds their exact codes and float16-exact scales, so they dequantize to the same float32 values."""
    m = copy.deepcopy(model)
    skip = {f"{n}.weight" for n in quantized}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name not in skip:
                p.copy_(p.half().float())
    return m


def assert_same_qw(a, b, what=""):
    for k in ("codes", "scales", "zeros", "g_idx"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {k} differs"
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym), what


def assert_same_results(a: dict, b: dict):
    assert set(a) == set(b)
    for n in a:
        assert_same_qw(a[n], b[n], n)


def layer_inputs(model, tokens, batch_size=8):
    """[(hidden, kwargs) entering each decoder layer] for the float model."""
    layers = decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, tokens, batch_size, "cpu")
    out = []
    with torch.no_grad():
        for layer in layers:
            out.append((hidden, kwargs))
            hidden = [(lambda o: o[0] if isinstance(o, tuple) else o)(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    return out


# ---------------------------------------------------------------------------------------------
# 1. Every architecture end to end

_CACHE = {}


def quantized_tiny(arch: str, true_sequential: bool):
    """(float model, quantized model, results, reports) for 4-bit g32 GPTQ, computed once per module run
    and shared by the tests below (which must not modify them)."""
    key = (arch, true_sequential)
    if key not in _CACHE:
        model = tiny_model(arch)
        results, reports = quantize_model(model, calib(), QuantConfig(scheme=FOUR_BIT, true_sequential=true_sequential))
        _CACHE[key] = (tiny_model(arch), model, results, reports)
    return _CACHE[key]


@pytest.mark.parametrize("true_sequential", [True, False], ids=["seq", "joint"])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_quantizes_every_decoder_linear(arch, true_sequential):
    float_model, model, quantized, reports = quantized_tiny(arch, true_sequential)

    # exactly the Linears inside the decoder layers: never lm_head or the embeddings
    expected = decoder_linear_names(model)
    assert len(expected) == (8 if arch == "phi3" else 14)      # phi3: fused qkv_proj and gate_up_proj
    assert set(quantized) == expected
    assert not any("lm_head" in n or "embed" in n for n in quantized)

    float_params = dict(float_model.named_parameters())
    for name, p in model.named_parameters():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in quantized:
            qw = quantized[module]
            assert qw.codes.shape == p.shape and qw.codes.dtype == torch.uint8
            assert int(qw.codes.max()) <= 15
            assert qw.scales.shape == (p.shape[1] // 32, p.shape[0])
            assert torch.equal(qw.g_idx, torch.arange(p.shape[1], dtype=torch.int32) // 32)
            assert torch.equal(p.data, qw.dequantize(p.dtype)), f"{name} is not its dequantized result"
            assert not torch.equal(p.data, float_params[name].data)
        else:   # embeddings, norms, biases, lm_head: untouched
            assert torch.equal(p.data, float_params[name].data), f"{name} changed"

    assert [r.index for r in reports] == [0, 1]
    for r in reports:
        assert set(r.modules) == {n.split(".", 3)[3] for n in expected if n.split(".")[2] == str(r.index)}
        for info in r.modules.values():
            assert 0 <= info["rel_error"] < 0.2 and info["damp"] == pytest.approx(0.01)

    tokens = calib()
    err = rel(logits(model, tokens), logits(float_model, tokens))
    assert err < LOGIT_REL_BOUND, f"{arch}: logits relative error {err:.3f}"


@pytest.mark.parametrize("true_sequential", [True, False], ids=["seq", "joint"])
@pytest.mark.parametrize("arch", ARCHS)
def test_artifact_round_trip(arch, true_sequential, tmp_path):
    """The artifact (sym -> GPTQ v1) reads back to the same integers and the same logits."""
    _, model, quantized, _ = quantized_tiny(arch, true_sequential)
    cfg = QuantConfig(scheme=FOUR_BIT, true_sequential=true_sequential)
    out = write_artifact(tmp_path / "artifact", model, None, quantized, formats.get("gptq"), quant_config_dict(cfg))
    loaded, tok, qc = load_artifact(out, dtype=torch.float32, with_tokenizer=False)
    assert tok is None and qc["checkpoint_format"] == "gptq" and qc["bits"] == 4
    for name, qw in quantized.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, DequantLinear)
        assert_same_qw(mod.quantized, qw, name)
        assert torch.equal(mod.weight, model.get_submodule(name).weight)
        assert (mod.bias is None) == (model.get_submodule(name).bias is None)
    tokens = calib()
    got = logits(loaded, tokens)
    # Unquantized tensors are stored as float16, so the exact reference is the in-memory model with
    # those rounded to float16: the same weights bit for bit and the same ops, so only float32
    # summation-order noise could remain (measured: none).
    same = logits(rounded_to_fp16(model, quantized), tokens)
    assert torch.allclose(got, same, rtol=1e-5, atol=1e-6), (got - same).abs().max()
    # Against the unrounded model the difference is the float16 rounding of norms, biases and
    # embeddings (2^-11 relative each): far below the quantization error (~0.06).
    assert rel(got, logits(model, tokens)) < 5e-3


def test_phi3_fused_projections_are_one_group_each():
    model = tiny_model("phi3")
    for layer, (hidden, kwargs) in zip(decoder_layers(model), layer_inputs(model, calib())):
        groups = input_groups(layer, hidden, kwargs)
        assert groups == [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]


# ---------------------------------------------------------------------------------------------
# 2. Grouping by shared input


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_input_groups_share_inputs(arch):
    model = tiny_model(arch)
    layers = decoder_layers(model)
    per_layer = layer_inputs(model, calib(), batch_size=4)
    assert len(per_layer) == len(layers) == 2
    for layer, (hidden, kwargs) in zip(layers, per_layer):
        assert input_groups(layer, hidden, kwargs) == [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


# ---------------------------------------------------------------------------------------------
# 3. Determinism


@pytest.mark.parametrize("cfg", [QuantConfig(scheme=FOUR_BIT),
                                 QuantConfig(scheme=FOUR_BIT.replace(sym=False, act_order="dynamic"), true_sequential=False)],
                         ids=["sym", "asym-desc_act"])
def test_deterministic(cfg):
    tokens = calib()
    a, ra = quantize_model(tiny_model("qwen2"), tokens, cfg)
    b, rb = quantize_model(tiny_model("qwen2"), tokens, cfg)
    assert_same_results(a, b)
    assert [r.modules for r in ra] == [r.modules for r in rb]
    if cfg.scheme.desc_act:   # the permuted order really was exercised
        assert any(not torch.equal(qw.g_idx, qw.g_idx.sort().values) for qw in a.values())


# ---------------------------------------------------------------------------------------------
# 4. Cancel and resume from the per-layer state


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_cancel_then_resume_matches_uninterrupted_run(arch, tmp_path):
    tokens = calib()
    cfg = QuantConfig(scheme=FOUR_BIT, batch_size=4)     # two calibration batches: two stored input tensors
    ref_model = tiny_model(arch, layers=4)
    ref, _ = quantize_model(ref_model, tokens, cfg)

    ckpt = tmp_path / "ckpt"
    calls = []

    def stop_after_layer_0():
        calls.append(1)
        return len(calls) > 1        # asked before layer 0 (go on), then before layer 1 (stop)

    done = []
    with pytest.raises(Cancelled, match="before layer 1"):
        quantize_model(tiny_model(arch, layers=4), tokens, cfg, state_dir=ckpt,
                       should_stop=stop_after_layer_0, on_layer=lambda r, n: done.append(r.index))
    assert len(calls) == 2 and done == [0]
    assert json.loads((ckpt / "manifest.json").read_text())["layers_done"] == 1
    assert (ckpt / "layer_00000.safetensors").exists() and not (ckpt / "layer_00001.safetensors").exists()

    fresh = tiny_model(arch, layers=4)
    resumed_layers = []
    res, reports = quantize_model(fresh, tokens, cfg, state_dir=ckpt,
                                  on_layer=lambda r, n: resumed_layers.append((r.index, n)))
    assert resumed_layers == [(1, 4), (2, 4), (3, 4)]      # layer 0 came from the checkpoint
    assert [r.index for r in reports] == [0, 1, 2, 3]
    assert_same_results(res, ref)
    for (n, p), (_, q) in zip(fresh.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n
    assert json.loads((ckpt / "manifest.json").read_text())["layers_done"] == 4

    # Resume state of another recipe (3-bit) is not reused: the run starts over at layer 0.
    cfg3 = QuantConfig(scheme=FOUR_BIT.replace(bits=3), batch_size=4)
    ref3, _ = quantize_model(tiny_model(arch, layers=4), tokens, cfg3)
    seen = []
    res3, _ = quantize_model(tiny_model(arch, layers=4), tokens, cfg3, state_dir=ckpt,
                             on_layer=lambda r, n: seen.append(r.index))
    assert seen == [0, 1, 2, 3]
    assert_same_results(res3, ref3)
    assert all(int(qw.codes.max()) <= 7 and qw.bits == 3 for qw in res3.values())


# The stored inputs are one tensor per calibration batch of the first run; batch_size is not part of
# the recipe, so a resume with another batch size must re-split them rather than drop samples.
def test_resume_with_another_batch_size_uses_every_sample(tmp_path, monkeypatch):
    tokens = calib()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        quantize_model(tiny_model("phi3"), tokens, QuantConfig(scheme=FOUR_BIT, batch_size=4), state_dir=ckpt,
                       should_stop=iter([False, True]).__next__)
    rows = []
    result = gptq.HessianAccumulator.result
    monkeypatch.setattr(gptq.HessianAccumulator, "result", lambda self: (rows.append(self.n), result(self))[1])
    quantize_model(tiny_model("phi3"), tokens, QuantConfig(scheme=FOUR_BIT, batch_size=8), state_dir=ckpt)
    assert len(rows) == 4                                          # layer 1's four Hessians
    assert rows == [tokens.numel()] * 4, f"Hessians saw {rows} rows of {tokens.numel()}"


# ---------------------------------------------------------------------------------------------
# 5. RTN through the driver


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_rtn_needs_no_tokens_and_matches_the_core(arch):
    float_model = tiny_model(arch)
    model = tiny_model(arch)
    cfg = QuantConfig(algorithm="rtn", scheme=FOUR_BIT)
    quantized, reports = quantize_model(model, None, cfg)
    assert set(quantized) == decoder_linear_names(model)
    for name, qw in quantized.items():
        expect = rtn.quantize_weight(float_model.get_submodule(name).weight, Scheme(bits=4, group_size=32, sym=True))
        assert_same_qw(qw, expect, name)
        assert torch.equal(model.get_submodule(name).weight, expect.dequantize())
    assert [r.index for r in reports] == [0, 1]

    with pytest.raises(QuantizationError, match="calibration tokens"):
        quantize_model(tiny_model(arch), None, QuantConfig(scheme=FOUR_BIT))


# ---------------------------------------------------------------------------------------------
# 6. Asymmetric: gptq_v2, exact zeros including 0


def test_asymmetric_writes_gptq_v2_and_reads_back_exactly(tmp_path):
    tokens = calib()
    model = tiny_model("llama")
    # An all-positive o_proj in layer 0: its groups have xmin = 0, so the asymmetric zero is 0,
    # which GPTQ v1 (zero - 1 stored unsigned) cannot hold.
    with torch.no_grad():
        w = model.model.layers[0].self_attn.o_proj.weight
        w.copy_(0.01 + w.abs())
    cfg = QuantConfig(scheme=FOUR_BIT.replace(sym=False))
    quantized, _ = quantize_model(model, tokens, cfg)
    zeros = torch.cat([qw.zeros.flatten() for qw in quantized.values()])
    assert (zeros == 0).any(), "the test needs zeros of 0"
    assert (zeros != 8).any()            # really asymmetric, not the symmetric midpoint

    class V1Only(GPTQ):                  # a writer that insists on v1: refused, and nothing half-written
        def to_tensors(self, qw, storage):
            return self.pack(qw, "gptq")
    with pytest.raises(SpecError, match="gptq_v2"):
        write_artifact(tmp_path / "v1", model, None, quantized, V1Only(), quant_config_dict(cfg))
    assert not (tmp_path / "v1").exists() and not list(tmp_path.glob(".v1*"))

    qc = quant_config_dict(cfg)
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    out = write_artifact(tmp_path / "v2", model, None, quantized, formats.get("gptq"), qc)
    loaded, _, qc_back = load_artifact(out, dtype=torch.float32, with_tokenizer=False)
    assert qc_back["checkpoint_format"] == "gptq_v2"
    for name, qw in quantized.items():
        back = loaded.get_submodule(name).quantized
        assert_same_qw(back, qw, name)
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
    same = logits(rounded_to_fp16(model, quantized), tokens)
    assert torch.allclose(logits(loaded, tokens), same, rtol=1e-5, atol=1e-6)
