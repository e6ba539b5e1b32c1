"""The AWQ GEMM and compressed-tensors pack-quantized layouts: bit-exact round trips checked by
unpackers written here from FORMATS.md, the GPTQ/compressed-tensors golden identity, artifacts of
GPTQ and AWQ results loaded through transformers + compressed-tensors, and preflight verdicts."""
import json

import pytest
import torch

import tiny
from core.errors import SpecError
from quantizers.artifact import load_artifact, read_tensors, save
from quantizers.config import QuantConfig
from quantizers.formats.awq import AWQ
from quantizers.formats.compressed_tensors import CompressedTensors
from quantizers.formats.gptq import GPTQ
from quantizers.grid import QuantizedWeight, group_index
from quantizers.scheme import Scheme
from quantizers.walk import quantize_model
from service.job import preflight

GS = 16


def random_qw(out_f=24, in_f=64, gs=GS, sym=False, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    G = in_f // gs
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = torch.full((G, out_f), 8, dtype=torch.int32) if sym else torch.randint(0, 16, (G, out_f), generator=g,
                                                                                    dtype=torch.int32)
    scales = (torch.rand(G, out_f, generator=g) * 0.1 + 1e-3).half().float()
    return QuantizedWeight(codes, scales, zeros, group_index(in_f, gs), 4, gs, sym)


def unpack_awq_by_hand(packed: torch.Tensor) -> torch.Tensor:
    """FORMATS.md §2, literally: nibble i of word c holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    for c in range(words):
        for i in range(8):
            out[:, 8 * c + order[i]] = (w[:, c] >> (4 * i)) & 0xF
    return out


def test_awq_layout_bit_exact_against_hand_unpacker():
    qw = random_qw()
    t = AWQ().to_tensors(qw, torch.float16)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64, 3)
    assert t["qzeros"].shape == (4, 3) and t["scales"].shape == (4, 24) and t["scales"].dtype == torch.float16
    assert torch.equal(unpack_awq_by_hand(t["qweight"]), qw.codes.t().to(torch.int64))
    assert torch.equal(unpack_awq_by_hand(t["qzeros"]), qw.zeros.to(torch.int64))    # true zeros, no -1
    back = AWQ().unpack(t, GS)
    for k in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, k), getattr(qw, k)), k
    # W[k, n] = (q - z) * s, from the hand-unpacked integers
    q, z = unpack_awq_by_hand(t["qweight"]).float(), unpack_awq_by_hand(t["qzeros"]).float()
    g = torch.arange(64) // GS
    W = (q - z[g]) * t["scales"].float()[g]
    assert torch.equal(W.t(), qw.dequantize())


def test_awq_interleave_of_a_known_word():
    codes = torch.arange(8, dtype=torch.uint8)[:, None].repeat(1, GS)   # output channel n holds value n
    qw = QuantizedWeight(codes, torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.int32), group_index(GS, GS), 4, GS, False)
    word = AWQ().to_tensors(qw, torch.float16)["qweight"][0, 0].item() & 0xFFFFFFFF
    assert word == 0x75316420                                         # nibbles 0,2,4,6,1,3,5,7 from the bottom


def test_awq_format_refusals():
    with pytest.raises(SpecError, match="4-bit"):
        AWQ().check(Scheme(8, 64), 128, 64)
    with pytest.raises(SpecError, match="in_features % group_size"):
        AWQ().check(Scheme(4, 128), 576, 64)
    shuffled = random_qw()
    shuffled.g_idx = shuffled.g_idx.flip(0)
    with pytest.raises(SpecError, match="act-order"):
        AWQ().to_tensors(shuffled, torch.float16)


def test_ct_golden_identity_with_gptq_sym():
    """For symmetric 4-bit: weight_packed == qweight.T and weight_scale == scales.T (FORMATS.md §3)."""
    qw = random_qw(sym=True)
    ct = CompressedTensors().to_tensors(qw, torch.float16)
    gp = GPTQ().pack(qw, "gptq")
    assert torch.equal(ct["weight_packed"], gp["qweight"].t())
    assert torch.equal(ct["weight_scale"], gp["scales"].t())
    assert ct["weight_shape"].tolist() == [24, 64] and "weight_zero_point" not in ct


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_ct_layout_matches_compressed_tensors_own_packer(bits, sym):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    qw = random_qw(out_f=20, sym=sym)                                 # 20 rows: zero points fill a partial word
    qw = QuantizedWeight((qw.codes.int() * (2 ** bits - 1) // 15).to(torch.uint8), qw.scales,
                         qw.zeros * (2 ** bits - 1) // 15 if not sym else torch.full_like(qw.zeros, 2 ** (bits - 1)),
                         qw.g_idx, bits, GS, sym)
    t = CompressedTensors().to_tensors(qw, torch.float16)
    signed = (qw.codes.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(t["weight_packed"], helpers.pack_to_int32(signed, bits))
    if not sym:
        zp = (qw.zeros.t().to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(t["weight_zero_point"], helpers.pack_to_int32(zp, bits, packed_dim=0))
    back = CompressedTensors().unpack(t, bits, GS, sym)
    assert torch.equal(back.dequantize(), qw.dequantize())


def _artifact(tmp_path, algorithm, fmt, arch="llama", bits=4):
    model = tiny.tiny_model(arch)
    sym = algorithm != "awq"
    act = "static" if algorithm == "gptq" else "none"
    cfg = QuantConfig(scheme=Scheme(bits=bits, group_size=GS, sym=sym, act_order=act), algorithm=algorithm)
    q, _ = quantize_model(model, tiny.calib() if algorithm != "rtn" else None, cfg)
    out = save(tmp_path / f"{algorithm}-{fmt}-{arch}", model, None, q, cfg, fmt,
               {"quantizer": ["quantfarm:test"], "algorithm": algorithm})
    return out, q


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


# transformers 5.23 with compressed-tensors 0.20 registers weight_zero_point unpacked ([out, G]) in its
# compressed path and then refuses the packed [out/8, G] tensor that compressed-tensors' own compressor
# writes (and vLLM reads; vllm-project/llm-compressor#1618, #1704). Decompressed at load
# (run_compressed=False) it reads them. preflight's transformers verdict says which path, checked here:
# the day the compressed path loads them, this test says so.
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_ct_artifact_through_transformers_equals_our_reader(tmp_path, algorithm):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from service.job import inspection
    out, q = _artifact(tmp_path, algorithm, "compressed-tensors")
    verdict = {v["runtime"]: v for v in inspection.describe(out)["compatibility"]}["transformers"]
    decompressed = "run_compressed=False" in verdict["path"]
    assert verdict["ok"] and decompressed == (algorithm == "awq"), verdict          # awq: asymmetric
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] == (algorithm == "gptq")
    ours, _, _ = load_artifact(out, with_tokenizer=False)
    for name, qw in q.items():
        assert torch.equal(ours.get_submodule(name).weight, qw.dequantize())
    if decompressed:
        with pytest.raises(RuntimeError, match="mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if decompressed else {}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu", **kw)
    tokens = tiny.calib(4, 32, seed=5)
    a, b = logits(ours, tokens), logits(theirs, tokens)
    assert ((a - b).norm() / a.norm()).item() < 2e-3        # fp16 rounding of their dequantization


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_ct_artifact_through_compressed_tensors_decompressor(tmp_path, algorithm):
    """compressed-tensors' own decompressor, fed our checkpoint tensors and our config group, gives
    our weights: asymmetric zero points included."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    out, q = _artifact(tmp_path, algorithm, "compressed-tensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(**group)
    tensors = read_tensors(out)
    for name, qw in q.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        assert ("weight_zero_point" in sd) == (algorithm == "awq")
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.allclose(w.float(), qw.dequantize(), rtol=1e-3, atol=0), name    # their product is in fp16


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_awq_artifact_round_trip(tmp_path, arch):
    out, q = _artifact(tmp_path, "awq", "awq", arch)
    assert json.loads((out / "quant_config.json").read_text()) == {"zero_point": True, "q_group_size": GS,
                                                                   "w_bit": 4, "version": "GEMM"}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["zero_point"], qc["bits"]) == ("awq", "gemm", True, 4)
    t = read_tensors(out)
    assert not any(k.endswith(".g_idx") for k in t)
    loaded, _, _ = load_artifact(out, with_tokenizer=False)
    for name, qw in q.items():
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize())


@pytest.mark.parametrize("algorithm", ["gptq", "rtn"])
def test_other_algorithms_as_awq_format(tmp_path, algorithm):
    """Zero-point results of any algorithm are writable as AWQ when the groups are natural (GPTQ with
    static act-order keeps g_idx monotonic)."""
    model = tiny.tiny_model("llama")
    cfg = QuantConfig(scheme=Scheme(bits=4, group_size=GS, sym=False, act_order="static" if algorithm == "gptq" else "none"),
                      algorithm=algorithm)
    q, _ = quantize_model(model, tiny.calib() if algorithm == "gptq" else None, cfg)
    out = save(tmp_path / "a", model, None, q, cfg, "awq", {"algorithm": algorithm})
    loaded, _, _ = load_artifact(out, with_tokenizer=False)
    for name, qw in q.items():
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize())
    dynamic = QuantConfig(scheme=Scheme(bits=4, group_size=GS, sym=False, act_order="dynamic"), algorithm="gptq")
    q2, _ = quantize_model(tiny.tiny_model("llama"), tiny.calib(), dynamic)
    with pytest.raises(SpecError, match="act-order"):
        save(tmp_path / "b", model, None, q2, dynamic, "awq", {})


# ---- preflight

SMOL = {(576, 576), (576, 192), (576, 1536), (1536, 576)}          # SmolLM2-135M's Linear shapes
WIDE = {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}


def verdicts(fmt, algorithm, bits, gs, sym, shapes, act="none"):
    """({"vllm" | "vllm-cpu" | "transformers": Verdict}, problems). What vLLM itself does with each of these
    verdicts is checked in tests/test_vllm.py; here, what preflight derives for real model shapes."""
    s = preflight.Target(fmt, algorithm, Scheme(bits, gs, sym, act))
    return {v.runtime: v for v in preflight.runtimes(s, shapes)}, preflight.problems(s, shapes)


def test_preflight_smollm2_shapes():
    v, p = verdicts("gptq", "gptq", 4, 128, True, SMOL, "static")
    assert not p                                             # GPTQ writes a ragged last group
    for runtime in ("vllm", "vllm-cpu"):                      # vLLM's loader refuses it, and preflight says why
        assert not v[runtime].ok and v[runtime].reason == "AssertionError"
        assert any("576 // 128 = 4 groups" in n for n in v[runtime].notes)
    assert v["transformers"].ok and "backend='torch'" in v["transformers"].path
    _, p = verdicts("awq", "awq", 4, 128, False, SMOL)
    assert any("576" in x for x in p)                          # 576 % 128: AWQ refuses
    _, p = verdicts("compressed-tensors", "gptq", 4, 128, True, SMOL)
    assert p
    v, p = verdicts("gptq", "gptq", 4, 64, True, SMOL, "static")        # the demo's settings load everywhere
    assert not p and v["vllm"].kernel == "MarlinLinearKernel" and v["vllm-cpu"].kernel == "CPUWNA16LinearKernel"
    v, p = verdicts("awq", "awq", 4, 64, False, SMOL)
    assert not p and v["vllm"].kernel == "MarlinLinearKernel"      # vLLM pads Marlin's tiles (192, 576)
    with pytest.raises(SpecError, match="group_size"):
        preflight.refuse_unwritable(preflight.report(preflight.Target("awq", "awq", Scheme(4, 128, False)), SMOL))


def test_preflight_wide_shapes():
    for fmt, algo, sym, method in [("gptq", "gptq", True, "auto_gptq"), ("awq", "awq", False, "auto_awq"),
                                   ("compressed-tensors", "gptq", True, "compressed-tensors")]:
        v, p = verdicts(fmt, algo, 4, 128, sym, WIDE, "static" if algo == "gptq" else "none")
        assert not p and v["vllm"].ok and v["vllm"].kernel == "MarlinLinearKernel", fmt
        assert v["vllm"].path.startswith(method) and v["vllm-cpu"].ok, fmt
    v, p = verdicts("gptq", "gptq", 3, 128, True, WIDE)
    assert not p and not v["vllm"].ok and v["vllm"].reason == "Unsupported quantization config: bits=3, sym=True"
    v, _ = verdicts("gptq", "gptq", 4, 128, False, WIDE)
    assert not v["vllm"].ok and "gptq_v2" in v["vllm"].notes[0]    # asymmetric GPTQ is gptq_v2
    v, _ = verdicts("gptq", "gptq", 8, 128, True, WIDE, "static")
    assert v["vllm"].ok and not v["vllm-cpu"].ok                          # vLLM CPU runs 4-bit only
    v, _ = verdicts("gptq", "gptq", 4, 128, True, WIDE, "dynamic")
    assert not v["vllm"].ok and "desc_act=True" in v["vllm"].reason and v["transformers"].ok
    v, _ = verdicts("gptq", "gptq", 4, -1, True, WIDE, "dynamic")             # one group: g_idx is all zeros
    assert v["vllm"].ok and v["vllm-cpu"].ok
    _, p = verdicts("awq", "awq", 8, 128, False, WIDE)
    assert any("4-bit" in x for x in p)
    _, p = verdicts("compressed-tensors", "gptq", 4, 128, True, WIDE, "dynamic")
    assert any("act-order" in x for x in p)


def test_preflight_on_a_4096_wide_model_config():
    """Shapes read from a model (built on the meta device: no memory) of Mistral-7B's widths."""
    import transformers as tf
    cfg = tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32768)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    shapes = preflight.model_shapes(model)
    assert shapes == {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    report = preflight.report(preflight.Target("awq", "awq", Scheme(4, 128, False)), shapes)
    assert report["writable"] and report["runtimes"][0]["kernel"] == "MarlinLinearKernel"
    report = preflight.report(preflight.Target("compressed-tensors", "gptq", Scheme(4, 256, True, "static")), shapes)
    gpu = report["runtimes"][0]
    assert report["writable"] and gpu["ok"] and not gpu["kernel"]          # 256 is no Marlin group size: a fallback
    assert any("group size 256" in n for n in gpu["notes"])


@pytest.mark.parametrize("act_order, group_size, desc_act", [("static", 32, False), ("none", 32, False),
                                                             ("dynamic", 32, True), ("dynamic", -1, False)])
def test_gptq_config_says_desc_act_only_for_a_non_monotonic_g_idx(tmp_path, act_order, group_size, desc_act):
    """desc_act tells loaders that g_idx may be out of order (vLLM then refuses the checkpoint): only dynamic
    act-order with groups makes it so. The act-order itself is kept in meta for `inspect`."""
    from service.job import inspection
    model = tiny.tiny_model("llama")
    cfg = QuantConfig(scheme=Scheme(bits=4, group_size=group_size, act_order=act_order))
    q, _ = quantize_model(model, tiny.calib(), cfg)
    out = save(tmp_path / "a", model, None, q, cfg, "gptq", {"algorithm": "gptq"})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    monotonic = all(bool((qw.g_idx.diff() >= 0).all()) for qw in q.values())
    assert qc["desc_act"] is desc_act and monotonic is not desc_act
    assert qc["meta"]["act_order"] == act_order and qc == json.loads((out / "quantize_config.json").read_text())
    d = inspection.describe(out)
    assert d["settings"]["act_order"] == act_order
    assert ("act-order " + act_order in inspection.render(d)) is (act_order != "none")
    gpu = next(v for v in d["compatibility"] if v["runtime"] == "vllm")
    assert gpu["ok"] is not desc_act and ("desc_act=True" in gpu["reason"]) is desc_act


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "rtn"])
def test_ct_scales_exact_for_a_bfloat16_model(tmp_path, algorithm):
    """compressed-tensors keeps scales in the model dtype: for a bfloat16 model the grid rounds scales
    to bfloat16 before choosing codes, so the artifact dequantizes to exactly the computed weights."""
    from quantizers.artifact import with_scale_dtype
    model = tiny.tiny_model("llama")
    model.config.dtype = torch.bfloat16
    base = QuantConfig(scheme=Scheme(bits=4, group_size=GS, sym=algorithm != "awq"), algorithm=algorithm)
    cfg = with_scale_dtype(base, "compressed-tensors", model)
    assert cfg.scheme.scale_dtype == "bfloat16" and with_scale_dtype(base, "awq", model).scheme.scale_dtype == "float16"
    q, _ = quantize_model(model, tiny.calib() if algorithm != "rtn" else None, cfg)
    out = save(tmp_path / "ct", model, None, q, cfg, "compressed-tensors", {})
    t = read_tensors(out)
    assert all(v.dtype == torch.bfloat16 for k, v in t.items() if k.endswith("weight_scale"))
    loaded, _, _ = load_artifact(out, with_tokenizer=False)
    for name, qw in q.items():
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize()), name
