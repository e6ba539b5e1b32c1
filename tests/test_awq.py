"""AWQ: the pure functions (grid, scale and clip searches) and the driver's AWQ path on tiny models
of every architecture (which op each scale folds into, that folding keeps the float function,
that AWQ beats plain zero-point rounding, resume)."""
import pytest
import torch

from quantizers import awq
from quantizers.awq_layer import _fold, smoothing_plan
from quantizers.config import QuantConfig
from quantizers.layers import capture_layer_inputs, decoder_layers, input_groups, layer_linears
from quantizers.walk import quantize_model
from quantizers.scheme import Scheme
from tiny import ARCHS, calib, tiny_config, tiny_model

AWQ = dict(algorithm="awq", scheme=Scheme(bits=4, group_size=16, sym=False))


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def first_layer(model, tokens):
    layers = decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, tokens, 4, "cpu")
    return layers[0], hidden, kwargs


# ---- the grid and the searches


def test_zero_point_grid_matches_formats_md():
    """scale = (max - min) / 15, z = clamp(-round(min / scale), 0, 15), on the group's own min and max
    (no forced zero: an all-positive group keeps its range)."""
    w = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    qw = awq.quantize_weight(w, Scheme(bits=4, group_size=4))
    scale = (4.0 - 0.5) / 15
    assert qw.scales.item() == torch.tensor(scale).half().float().item()
    assert qw.zeros.item() == 0 and not qw.sym           # -round(0.5 / 0.233) = -2 -> clamped to 0
    assert qw.codes.tolist() == [[2, 4, 9, 15]]          # round(w / scale) + 0, clamped to 15
    w2 = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    qw2 = awq.quantize_weight(w2, Scheme(bits=4, group_size=4))
    s2 = torch.tensor(3.0 / 15).half().float()
    assert qw2.zeros.item() == round(1.0 / s2.item())
    assert torch.allclose(qw2.dequantize(), w2, atol=s2.item() / 2 + 1e-6)


def test_search_grid_includes_identity_and_both_modes():
    grid = awq.search_grid(20, "both")
    assert len(grid) == 20 and (0.0, False) in grid and {d for _, d in grid} == {False, True}
    assert grid[-1][0] == 1.0
    default = awq.search_grid()
    assert len(default) == 20 and default[0] == (0.0, False) and all(d for _, d in default[1:])
    assert default[-1] == (1.0, True)


def test_scale_search_never_loses_to_plain_rounding_and_prefers_salient_channels():
    torch.manual_seed(0)
    X = torch.randn(512, 64)
    X[:, :4] *= 20                                        # a few salient input channels
    W = torch.randn(32, 64) * 0.05
    ref = X @ W.t()

    def loss(cands):
        return ((X @ cands[0].t()) - ref).pow(2).mean().item()
    found = awq.search_scale(X.abs().mean(0), [W], Scheme(bits=4, group_size=16), loss)
    assert found.loss <= found.identity_loss
    assert found.loss < 0.8 * found.identity_loss         # scaling the salient channels up helps a lot here
    assert found.scale[:4].mean() > found.scale[4:].mean()


def test_clip_search_lowers_the_group_output_error():
    torch.manual_seed(1)
    X = torch.randn(1024, 64)
    W = torch.randn(48, 64)
    W[::7, 3] = 8.0                                       # outliers that stretch their groups' ranges
    H = 2 * X.t() @ X / X.shape[0]
    Wc = awq.search_clip(W, H, Scheme(bits=4, group_size=16))

    def err(w):
        E = awq.fake_quantize(w, 4, 16) - W
        return torch.sum((E @ H) * E).item()
    assert err(Wc) < err(W)
    assert (Wc.abs() <= W.abs() + 1e-7).all()             # clipping only shrinks
    blocks = awq.diagonal_blocks(H, 16)
    assert torch.equal(blocks[2], H[32:48, 32:48])


# ---- the model plumbing


def _no_gqa(arch):
    cfg = tiny_config(arch)
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    import transformers as tf
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_plan(arch):
    model = tiny_model(arch)
    layer, hidden, kwargs = first_layer(model, calib())
    plan = {tuple(s.group): s for s in smoothing_plan(layer, input_groups(layer, hidden, kwargs), hidden, kwargs)}
    fused = arch == "phi3"
    attn = ("self_attn.qkv_proj",) if fused else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp = ("mlp.gate_up_proj",) if fused else ("mlp.gate_proj", "mlp.up_proj")
    assert plan[attn].prev == "input_layernorm" and plan[attn].block == "self_attn"
    assert plan[mlp].prev_is_norm and plan[mlp].block == "mlp"
    assert plan[("mlp.down_proj",)].prev == ("mlp.gate_up_proj" if fused else "mlp.up_proj")
    assert ("self_attn.o_proj",) not in plan              # grouped-query attention: v -> o cannot fold
    assert plan[attn].norm_offset == (1.0 if arch == "gemma" else 0.0)
    if arch in ("llama", "phi3"):                         # same heads for k/v as for q: v -> o folds
        full = _no_gqa(arch)
        layer, hidden, kwargs = first_layer(full, calib())
        plan = {tuple(s.group): s for s in smoothing_plan(layer, input_groups(layer, hidden, kwargs), hidden, kwargs)}
        assert plan[("self_attn.o_proj",)].prev == ("self_attn.qkv_proj" if fused else "self_attn.v_proj")


@pytest.mark.parametrize("arch", ARCHS + ("llama-mha", "phi3-mha"))
def test_folding_keeps_the_float_model(arch):
    """X / s in the producer and W * s in the group compute the same function, for norms (Gemma's
    1 + w included), plain and fused producers."""
    model = _no_gqa(arch.split("-")[0]) if arch.endswith("-mha") else tiny_model(arch)
    tokens = calib()
    before = logits(model, tokens)
    layer, hidden, kwargs = first_layer(model, tokens)
    plan = smoothing_plan(layer, input_groups(layer, hidden, kwargs), hidden, kwargs)
    assert len(plan) == (4 if arch.endswith("-mha") else 3)
    g = torch.Generator().manual_seed(3)
    for sm in plan:
        n = layer_linears(layer)[sm.group[0]].in_features
        _fold(layer, sm, torch.rand(n, generator=g) * 3 + 0.2, layer_linears(layer))
    assert rel(logits(model, tokens), before) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_beats_zero_point_rounding(arch):
    tokens = calib(n=16)
    ref = logits(tiny_model(arch), tokens)
    errs = {}
    for algo in ("rtn", "awq"):
        m = tiny_model(arch)
        q, reports = quantize_model(m, tokens if algo == "awq" else None, QuantConfig(**{**AWQ, "algorithm": algo}))
        assert all(not qw.sym and qw.bits == 4 for qw in q.values())
        errs[algo] = rel(logits(m, tokens), ref)
    assert errs["awq"] < errs["rtn"], errs
    mods = reports[0].modules
    assert all("rel_error" in v for v in mods.values())
    assert any("scale_ratio" in v for v in mods.values())


def test_awq_model_is_what_its_results_dequantize_to():
    m = tiny_model("qwen2")
    q, _ = quantize_model(m, calib(), QuantConfig(**AWQ))
    for name, qw in q.items():
        assert torch.equal(m.get_submodule(name).weight, qw.dequantize())


def test_awq_resume_is_identical(tmp_path):
    """Folded norms are part of a layer's checkpoint: a resumed run equals an uninterrupted one."""
    tokens = calib()
    cfg = QuantConfig(**AWQ)
    full = tiny_model("gemma", layers=3)
    q_full, _ = quantize_model(full, tokens, cfg)

    class Stop(Exception):
        pass

    def stop_after_first(rep, total):
        if rep.index == 0:
            raise Stop
    with pytest.raises(Stop):
        quantize_model(tiny_model("gemma", layers=3), tokens, cfg, state_dir=tmp_path, on_layer=stop_after_first)
    resumed = tiny_model("gemma", layers=3)
    q_res, _ = quantize_model(resumed, tokens, cfg, state_dir=tmp_path)
    assert q_res.keys() == q_full.keys()
    for n in q_full:
        assert torch.equal(q_full[n].codes, q_res[n].codes) and torch.equal(q_full[n].scales, q_res[n].scales)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_awq_refuses_ragged_groups():
    with pytest.raises(ValueError, match="multiple of the group size"):
        awq.quantize_weight(torch.randn(8, 40), Scheme(bits=4, group_size=16))


def test_search_dtype_default():
    from quantizers.awq_layer import search_dtype
    assert search_dtype("float32", torch.device("cpu")) is torch.float32
    assert search_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)

