"""Byte compatibility of our GPTQ artifacts with the ecosystem's own readers (FORMATS.md §1, §3).

The judges are the independent readers: transformers + optimum + gptqmodel for the GPTQ checkpoint
folder, compressed-tensors for the packed-integer layout. If they disagree with us, we are wrong.

Loading recipe for transformers 5 + gptqmodel 7.6 on CPU (what `eco_model` does):

    AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16,
                                         quantization_config=GPTQConfig(bits=b, backend="torch"))

`dtype` must be float16 or bfloat16 (gptqmodel's CPU kernels declare no float32). Without
`backend` gptqmodel picks `TorchAtenLinear` for 4-bit, which runs in bfloat16 (activations and
scales) and crashes when in_features % group_size != 0; `backend="torch"` (`TorchLinear`, all of
2/3/4/8 bits) dequantizes in the model dtype and matmuls, which allows exact comparisons.
`TorchLinear` wraps its dequantization in torch.compile (inductor: ~35 s on this CPU for the first
forward), so the forward passes here run with dynamo disabled: the same Python code, eagerly.

Tolerances (logits are O(1) here, max |logit| ~ 1):
- gptqmodel's dequantized weights vs `QuantizedWeight.dequantize(float16)`: exact. Both compute one
  float16 rounding of scale * (q - z), which is exact in float32.
- transformers+gptqmodel float16 logits vs our reader's float16 logits: atol 2e-3 (4 float16 ulps
  at 1.0). Same weights bit for bit, same graph; only matmul accumulation order may differ.
- ... vs our reader's float32 logits: atol = rtol = 5e-3. float16 carries 11 significant bits
  (unit roundoff 4.9e-4); the rounding of activations through two layers was measured at <=1e-3.
- gptqmodel's default 4-bit CPU kernel (bfloat16 activations, scales rounded to bfloat16, 8
  significant bits) vs our float32 logits: atol = rtol = 3e-2 (measured ~6e-3).
"""
from dataclasses import dataclass

import pytest
import torch

from quantizers import gptq, rtn
from quantizers.formats.gptq import GPTQ
from quantizers.artifact import load_artifact, write_artifact
from quantizers.config import QuantConfig
from quantizers.walk import quantize_model
from quantizers.scheme import ActOrder, Scheme

import tiny

VOCAB = tiny.VOCAB


@dataclass(frozen=True)
class Case:
    arch: str            # "llama" / "qwen2" (tiny.py: hidden 64) or "ragged" (hidden 192, see below)
    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False


CASES = {
    "sym4_g32": Case("llama", 4, 32, True),                       # checkpoint_format "gptq" (v1)
    "asym4_g32": Case("llama", 4, 32, False),                     # "gptq_v2", some zero points are 0
    "sym4_g32_act": Case("llama", 4, 32, True, desc_act=True),    # non-monotonic g_idx
    "sym8_g32_bias": Case("qwen2", 8, 32, True),                  # q/k/v biases
    "sym2_g32": Case("llama", 2, 32, True),
    "sym3_g32": Case("llama", 3, 32, True),                       # v1 zeros spill across words
    "asym3_g32_act": Case("llama", 3, 32, False, desc_act=True),
    "ragged_sym4_g128_act": Case("ragged", 4, 128, True, desc_act=True),  # in=192, 320: last group short
}

TOKENS = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(123))


def _ragged_llama(seed: int = 0):
    """A Llama whose in_features are not multiples of 128 (like SmolLM2's 576 with g128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _build_model(case: Case):
    model = _ragged_llama() if case.arch == "ragged" else tiny.tiny_model(case.arch)
    with torch.no_grad():
        # One all-positive row: its asymmetric grid has xmin = 0, so zero point 0, the value GPTQ v1
        # (which stores z - 1) cannot hold. Makes the v1/v2 choice matter for the asym cases.
        w = model.model.layers[0].mlp.up_proj.weight
        w[0] = w[0].abs() + 0.05
    return model


@pytest.fixture(scope="module", params=list(CASES))
def artifact(request, tmp_path_factory):
    """(case, artifact folder, {module: QuantizedWeight} as quantize_model returned them)."""
    case = CASES[request.param]
    model = _build_model(case)
    tokens = tiny.calib(8, 64, VOCAB, seed=0)
    cfg = QuantConfig(scheme=Scheme(bits=case.bits, group_size=case.group_size, sym=case.sym, act_order=ActOrder.of(case.desc_act, False)), algorithm="gptq")
    quantized, _ = quantize_model(model, tokens, cfg, "cpu")
    qc, side = GPTQ().config(cfg.scheme, {"damp_percent": cfg.damp_percent}, {"quantizer": "quantfarm:test"})
    out = tmp_path_factory.mktemp(request.param) / "artifact"
    write_artifact(out, model, None, quantized, GPTQ(), quant_config=qc, side_files=side)
    return case, out, quantized


def _require_gptqmodel():
    pytest.importorskip("optimum", reason="transformers loads GPTQ through optimum (pip install .[compat])")
    pytest.importorskip("gptqmodel", reason="transformers loads GPTQ through gptqmodel (pip install .[compat])")


def _no_compile():
    return torch._dynamo.config.patch(disable=True)


def _load_eco(folder, bits: int, backend: str | None):
    """transformers' own loading of the artifact; returns (model, loading info)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    kw = {} if backend is None else {"quantization_config": GPTQConfig(bits=bits, backend=backend)}
    with _no_compile():
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16,
                                                    output_loading_info=True, **kw)


def _eco_qlinears(model) -> dict:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


def _eco_dequantized(mod) -> torch.Tensor:
    """gptqmodel's dequantization of one Linear, [out, in]. Called through the class so that the
    torch.compile wrapper `optimize()` put on the instance is bypassed (same code, eager)."""
    with _no_compile(), torch.no_grad():
        return type(mod).dequantize_weight(mod).t()


def _logits(model, tokens=TOKENS) -> torch.Tensor:
    with _no_compile(), torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def eco_model(artifact):
    """The artifact as transformers + optimum + gptqmodel load it, with gptqmodel's torch kernel."""
    _require_gptqmodel()
    case, folder, _ = artifact
    model, info = _load_eco(folder, case.bits, "torch")
    return model, info


@pytest.fixture(scope="module")
def our_logits(artifact):
    _, folder, _ = artifact
    out = {}
    for dtype in (torch.float16, torch.float32):
        model, _, _ = load_artifact(folder, dtype=dtype, with_tokenizer=False)
        out[dtype] = _logits(model)
    return out


def test_artifact_declares_the_format_for_its_zero_points(artifact):
    import json

    case, folder, quantized = artifact
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == ("gptq" if case.sym else "gptq_v2")
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == \
        (case.bits, case.group_size, case.sym, case.desc_act)
    if not case.sym:      # the case v1 cannot hold really occurs, so v2 is what gets tested
        assert any(bool((qw.zeros == 0).any()) for qw in quantized.values())
    if case.desc_act:
        assert any(bool((qw.g_idx.diff() < 0).any()) for qw in quantized.values())
    if case.arch == "ragged":
        assert any(qw.codes.shape[1] % case.group_size for qw in quantized.values())


def test_transformers_loads_every_tensor(artifact, eco_model):
    _, _, quantized = artifact
    model, info = eco_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(_eco_qlinears(model)) == set(quantized)


def test_gptqmodel_dequantizes_our_weights_exactly(artifact, eco_model):
    """gptqmodel's reading of qweight/qzeros/scales/g_idx (v1 zeros + 1, v2 as stored, 3-bit spill,
    act-order g_idx) gives bit for bit the weights our quantizer produced. Exact on any CPU although
    the code differs: a float16 scale times an integer below 2^8 is one correctly rounded product."""
    _, _, quantized = artifact
    model, _ = eco_model
    for name, mod in _eco_qlinears(model).items():
        theirs = _eco_dequantized(mod)
        ours = quantized[name].dequantize(torch.float16)
        assert theirs.dtype == torch.float16 and theirs.shape == ours.shape, name
        mismatch = (theirs != ours).sum().item()
        assert mismatch == 0, f"{name}: {mismatch} of {ours.numel()} weights differ, max " \
                              f"{(theirs.float() - ours.float()).abs().max().item():.3g}"


def test_transformers_logits_match_our_reader(eco_model, our_logits):
    model, _ = eco_model
    theirs = _logits(model)
    assert theirs.dtype == torch.float16 and torch.isfinite(theirs).all()
    torch.testing.assert_close(theirs, our_logits[torch.float16], atol=2e-3, rtol=0)
    torch.testing.assert_close(theirs.float(), our_logits[torch.float32], atol=5e-3, rtol=5e-3)


def test_default_cpu_kernel(artifact, request):
    """What a user gets without choosing a backend: for 4-bit gptqmodel picks its ATen int4 kernel."""
    case, folder, quantized = artifact
    if case.bits != 4:
        pytest.skip("gptqmodel's default CPU kernel choice for non-4-bit is the torch kernel tested above")
    _require_gptqmodel()
    model, info = _load_eco(folder, case.bits, None)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    qlinears = _eco_qlinears(model)
    # Exact across the two implementations on any CPU: a float16 scale times an integer below 2^8 is
    # exact in float32 and rounds once to float16, which is also what one float16 multiply gives.
    for name, mod in qlinears.items():       # before the first forward repacks qweight for ATen
        assert torch.equal(_eco_dequantized(mod), quantized[name].dequantize(torch.float16)), name
    kernel = type(next(iter(qlinears.values()))).__name__
    try:
        theirs = _logits(model)
    except RuntimeError as e:
        if case.arch == "ragged" and "divisible by qGroupSize" in str(e):
            pytest.xfail(f"gptqmodel's default CPU kernel {kernel} cannot run in_features % group_size != 0 "
                         f"(load with GPTQConfig(backend='torch')): {e}")
        raise
    ours = request.getfixturevalue("our_logits")[torch.float32]
    torch.testing.assert_close(theirs.float(), ours, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# compressed-tensors: FORMATS.md §3, weight_packed == qweight.T with the signed offset


def _ct():
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                               reason="compressed-tensors is not installed (pip install .[test])")


def _sym_weight(out_f: int, in_f: int, bits: int, group_size: int, desc_act: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    if not desc_act:
        return rtn.quantize_weight(W, Scheme(bits=bits, group_size=group_size, sym=True))
    X = torch.randn(4 * in_f, in_f, generator=g) * torch.rand(in_f, generator=g)
    qw, _ = gptq.quantize_weight(W, 2 * X.t() @ X / X.shape[0], Scheme(bits=bits, group_size=group_size, sym=True, act_order="dynamic"))
    return qw


SHAPES = [(192, 576, 128, False), (192, 576, 128, True), (64, 256, 32, False)]   # out, in, gs, act-order


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_f,in_f,gs,act", SHAPES)
def test_compressed_tensors_reads_our_packed_integers(bits, out_f, in_f, gs, act):
    ct = _ct()
    qw = _sym_weight(out_f, in_f, bits, gs, act)
    t = GPTQ().pack(qw, "gptq")
    offset = 2 ** (bits - 1)                     # = the symmetric zero point (maxq + 1) / 2
    signed = (qw.codes.to(torch.int16) - offset).to(torch.int8)
    weight_packed = t["qweight"].t().contiguous()
    unpacked = ct.unpack_from_int32(weight_packed, bits, torch.Size([out_f, in_f]))
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, signed)
    packed = ct.pack_to_int32(signed, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, weight_packed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_decompresses_to_our_weights(bits):
    """The whole pack-quantized reader: weight_packed = qweight.T, weight_scale = scales.T."""
    _ct()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    out_f, in_f, gs = 192, 512, 128
    qw = _sym_weight(out_f, in_f, bits, gs, False)
    t = GPTQ().pack(qw, "gptq")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs))
    sd = {"weight_packed": t["qweight"].t().contiguous(), "weight_scale": t["scales"].t().contiguous(),
          "weight_shape": torch.tensor([out_f, in_f])}
    w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    assert torch.equal(w, qw.dequantize(torch.float16))      # exact: one rounding of an exact product


def test_compressed_tensors_group_strategy_needs_whole_groups():
    """Pinned reader constraint: compressed-tensors' group strategy refuses in % group_size != 0, so
    a pack-quantized writer must refuse (preflight) SmolLM2-like shapes (576 with g128)."""
    _ct()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qw = _sym_weight(192, 576, 4, 128, False)
    t = GPTQ().pack(qw, "gptq")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=128))
    sd = {"weight_packed": t["qweight"].t().contiguous(), "weight_scale": t["scales"].t().contiguous(),
          "weight_shape": torch.tensor([192, 576])}
    with pytest.raises(ValueError, match="group_size"):
        PackedQuantizationCompressor.decompress(sd, scheme)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_artifact_through_transformers_and_gptqmodel(tmp_path, arch):
    """transformers loads our AWQ GEMM artifact through gptqmodel's AWQ kernel; its logits equal our
    reader's up to fp16 arithmetic (a wrong interleave or a zero off by one gives errors of order 1)."""
    _require_gptqmodel()
    from transformers import AutoModelForCausalLM

    from quantizers.artifact import save
    model = tiny.tiny_model(arch)
    cfg = QuantConfig(scheme=Scheme(bits=4, group_size=32, sym=False), algorithm="awq")   # its CPU kernel takes 32/64/128/256
    q, _ = quantize_model(model, tiny.calib(), cfg, "cpu")
    out = save(tmp_path / "awq", model, None, q, cfg, "awq", {"quantizer": ["quantfarm:test"]})
    ours, _, _ = load_artifact(out, with_tokenizer=False)
    with _no_compile():
        theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16)
        tokens = tiny.calib(4, 32, VOCAB, seed=7)
        with torch.no_grad():
            a = ours(input_ids=tokens).logits
            b = theirs(input_ids=tokens).logits.float()
    assert "Awq" in type(theirs.get_submodule(next(iter(q)))).__name__
    # theirs runs the whole model in float16, ours in float32: 2-3e-3 apart measured (llama, qwen2);
    # a wrong interleave, a zero off by one or a transposed scale gives order-1 differences
    assert ((a - b).norm() / a.norm()).item() < 1e-2

