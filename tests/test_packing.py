"""Bit packing and the GPTQ tensor layout, checked against FORMATS.md written out independently here."""
import pytest
import torch

from quantizers.formats.gptq import GPTQ, layout as gptq_layout
from quantizers.grid import QuantizedWeight
from quantizers.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def reference_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """FORMATS.md, literally: one little-endian bitstream per column, value j at bits [b*j, b*(j+1))."""
    n, m = values.shape
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    for col in range(m):
        stream = 0
        for j in range(n):
            stream |= int(values[j, col]) << (bits * j)
        for w in range(out.shape[0]):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[w, col] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_and_reference_layout(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2 ** bits, (64, 5), generator=g)
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    assert torch.equal(packed, reference_pack_rows(v, bits))
    assert torch.equal(unpack_rows(packed, bits, 64), v.to(torch.int32))
    assert torch.equal(unpack_cols(pack_cols(v.t(), bits), bits, 64), v.t().to(torch.int32))


def test_unpackable_shape_is_refused():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(10, 3, dtype=torch.int64), 4)


def random_weight(bits, in_f, out_f, gs, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-in_f // gs)
    codes = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(G, out_f, generator=g) + 0.01).half().float()
    zeros = (torch.full((G, out_f), 2 ** (bits - 1)) if sym
             else torch.randint(0, 2 ** bits, (G, out_f), generator=g)).to(torch.int32)
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, gs, sym)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_tensors_round_trip(bits, sym):
    qw = random_weight(bits, 576, 64, 128, sym)      # ragged: 4 x 128 + 64
    fmt = gptq_layout(sym)
    t = GPTQ().pack(qw, fmt)
    assert t["qweight"].shape == (576 * bits // 32, 64)
    assert t["qzeros"].shape == (5, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (5, 64)
    back = GPTQ().unpack(t, bits, fmt, sym, 128)
    for k in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, k), getattr(qw, k)), k
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_v1_sym_4bit_zero_word():
    t = GPTQ().pack(random_weight(4, 128, 64, 32, True), "gptq")
    assert torch.all(t["qzeros"] == 0x77777777)       # zero 8 stored as 7, eight per word


def test_v1_refuses_asymmetric():
    from core.errors import SpecError
    with pytest.raises(SpecError, match="gptq_v2"):
        GPTQ().pack(random_weight(4, 128, 64, 32, False), "gptq")


def test_dequantize_formula():
    """W[n, k] = scales[g_idx[k], n] * (q[n, k] - z[g_idx[k], n]), written out element by element."""
    qw = random_weight(4, 64, 8, 16, False)
    W = qw.dequantize()
    for n in range(8):
        for k in range(0, 64, 7):
            g = qw.g_idx[k]
            assert W[n, k] == qw.scales[g, n] * (qw.codes[n, k].float() - qw.zeros[g, n])
