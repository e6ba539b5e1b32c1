"""Packing small integers into int32 words, LSB first, along dim 0.

Every layout in ../shared/FORMATS.md is this one bitstream: value j of a run sits at bits [b*j, b*(j+1))
of the concatenated little-endian words. For 2/4/8 bits a word holds 32/b whole values; 3-bit
values spill across word boundaries (AutoGPTQ's pack() is the same stream written by hand), so
32 values fill exactly 3 words.
"""
import torch


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int, pad: bool = False) -> torch.Tensor:
    """values [n, m] in [0, 2**bits) -> int32 [n * bits / 32, m]. n * bits must be a multiple of 32
    unless `pad`: then zeros fill the last word (compressed-tensors' zero points)."""
    n, m = values.shape
    if (n * bits) % 32:
        if not pad:
            raise ValueError(f"cannot pack {n} rows of {bits}-bit values into whole 32-bit words")
        fill = 32 if 32 % bits else 32 // bits
        extra = -n % fill
        values = torch.cat([values, values.new_zeros(extra, m)])
        return pack_rows(values, bits)[:-(-n * bits // 32)]
    v = values.to(torch.int64)
    if 32 % bits == 0:
        pf = 32 // bits
        shifts = (torch.arange(pf, device=v.device) * bits)[None, :, None]
        return _to_int32((v.reshape(n // pf, pf, m) << shifts).sum(1))
    bitpos = torch.arange(bits, device=v.device)
    stream = ((v[:, None, :] >> bitpos[None, :, None]) & 1).reshape(n * bits // 32, 32, m)
    return _to_int32((stream << torch.arange(32, device=v.device)[None, :, None]).sum(1))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n * bits / 32, m] -> int32 values [n, m]."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    words, m = w.shape
    if 32 % bits == 0:
        pf = 32 // bits
        shifts = (torch.arange(pf, device=w.device) * bits)[None, :, None]
        return ((w[:, None, :] >> shifts) & (2 ** bits - 1)).reshape(words * pf, m)[:n].to(torch.int32)
    stream = ((w[:, None, :] >> torch.arange(32, device=w.device)[None, :, None]) & 1).reshape(-1, bits, m)
    vals = (stream << torch.arange(bits, device=w.device)[None, :, None]).sum(1)
    return vals[:n].to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int, pad: bool = False) -> torch.Tensor:
    """values [m, n] -> int32 [m, n * bits / 32], packed along dim 1."""
    return pack_rows(values.t(), bits, pad).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, n).t().contiguous()
