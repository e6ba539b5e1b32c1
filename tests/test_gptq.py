"""The GPTQ and RTN cores as pure functions on tensors."""
import pytest
import torch

from quantizers import gptq, rtn
from quantizers.gptq import relative_error
from quantizers.grid import grid_params
from quantizers.scheme import Scheme
from core.errors import QuantizationError


def problem(out_f=96, in_f=160, n=2048, seed=0):
    """Correlated inputs with a few outlier channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    X = torch.randn(n, in_f, generator=g) @ A + 0.1 * torch.randn(n, in_f, generator=g)
    X[:, :3] *= 10
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    acc = gptq.HessianAccumulator(in_f, "cpu")
    acc.add(X)
    return W, acc.result()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_gptq_beats_rtn_on_output_error(bits, group_size):
    W, H = problem()
    q, stats = gptq.quantize_weight(W, H, Scheme(bits=bits, group_size=group_size, sym=True))
    r = rtn.quantize_weight(W, Scheme(bits=bits, group_size=group_size, sym=True))
    e_gptq, e_rtn = relative_error(W, q.dequantize(), H), relative_error(W, r.dequantize(), H)
    assert stats.rel_error == pytest.approx(e_gptq)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert q.codes.max().item() <= 2 ** bits - 1


def test_grid_conventions():
    W = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    s, z = grid_params(W, 4, sym=True)
    assert torch.all(z == 8)                               # (maxq + 1) / 2
    assert s[0].item() == pytest.approx(2 / 15, rel=1e-3)  # xmax = |xmin| = 1
    assert s[1].item() == pytest.approx(2 / 15, rel=1e-3)  # all-zero group uses [-1, 1]
    s, z = grid_params(W, 4, sym=False)
    assert z[2].item() == 0                                # xmin clamped to 0 for a positive row
    assert s[2].item() == pytest.approx(0.4 / 15, rel=1e-3)
    assert torch.equal(s, s.half().float())                # scales are float16-exact


def test_ragged_last_group_and_asym():
    W, H = problem(out_f=64, in_f=160)
    q, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=64, sym=False))
    assert q.scales.shape == (3, 64) and q.zeros.shape == (3, 64)     # 64 + 64 + 32
    assert torch.equal(q.g_idx, torch.arange(160, dtype=torch.int32) // 64)
    assert q.zeros.min() >= 0 and q.zeros.max() <= 15
    assert relative_error(W, q.dequantize(), H) < relative_error(W, rtn.quantize_weight(W, Scheme(bits=4, group_size=64, sym=False)).dequantize(), H)


def test_desc_act_groups_follow_hessian_order():
    W, H = problem()
    q, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32, act_order="dynamic"))
    order = torch.argsort(torch.diag(H), descending=True)
    expect = torch.empty(W.shape[1], dtype=torch.int32)
    expect[order] = torch.arange(W.shape[1], dtype=torch.int32) // 32
    assert torch.equal(q.g_idx, expect)
    assert not torch.all(q.g_idx[1:] >= q.g_idx[:-1])          # non-monotonic
    # the first group created holds the columns of largest diag(H): its scales come from them
    first = order[:32]
    s0, _ = grid_params(W[:, first], 4, True)
    assert q.scales.shape[0] == 5
    assert torch.equal(q.scales[0], s0)                         # nothing quantized before it


def test_static_groups_keep_natural_g_idx():
    W, H = problem()
    q, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32, act_order="static"))
    assert torch.equal(q.g_idx, torch.arange(W.shape[1], dtype=torch.int32) // 32)
    for g in range(5):      # grids from the unmodified weights, natural column order
        s, z = grid_params(W[:, g * 32:(g + 1) * 32], 4, True)
        assert torch.equal(q.scales[g], s)


def test_dead_columns_become_zero():
    W, H = problem()
    H[5, :] = 0
    H[:, 5] = 0
    q, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32, sym=True))
    assert torch.all(q.dequantize()[:, 5] == 0)


def test_damping_increases_until_cholesky_succeeds():
    W, _ = problem()
    X = torch.randn(20, W.shape[1])           # rank 20 < 160 columns, no dead column
    H = 2 * X.t() @ X / 20
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H)
    q, stats = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32), damp_percent=0.0)
    assert stats.damp > 0
    assert torch.isfinite(q.dequantize()).all()


def test_hopeless_hessian_raises_clear_error():
    W, _ = problem()
    H = -torch.eye(W.shape[1])
    with pytest.raises(QuantizationError, match="not positive definite"):
        gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32))


def test_concatenated_rows_equal_separate_quantization():
    """Why q/k/v can be quantized as one matrix: rows are independent given H. Bit-exact because it
    is one code path on one device: every step works per row, and the one matrix product (the
    between-block update, an sgemm at 40 and at 96 rows) sums each row in the same order."""
    W, H = problem(out_f=96)
    whole, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32))
    top, _ = gptq.quantize_weight(W[:40], H, Scheme(bits=4, group_size=32))
    assert torch.equal(whole.rows(0, 40).codes, top.codes)
    assert torch.equal(whole.rows(0, 40).scales, top.scales)


def test_deterministic():
    W, H = problem()
    a, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32, act_order="dynamic"))
    b, _ = gptq.quantize_weight(W, H, Scheme(bits=4, group_size=32, act_order="dynamic"))
    for k in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, k), getattr(b, k))
