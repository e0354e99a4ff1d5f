"""Unpacking the integer codes that AWQ, GPTQ and compressed-tensors store several to an int32.

All three pack ``32 / bits`` codes per int32 word, least significant bits first; they differ in the axis they pack
along and (AWQ) in the order of the codes inside a word.
"""

from __future__ import annotations

import torch

# AutoAWQ's "gemm" layout stores logical column AWQ_ORDER[i] in nibble i of each word; reading the nibbles in
# the inverse order puts the columns back in sequence.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``packed`` int32 words → unsigned codes (int32), ``32 / bits`` per word along ``dim``, LSB first."""
    dim = dim % packed.dim()
    shape = [1] * (packed.dim() + 1)
    shape[dim + 1] = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(shape)
    # Shift a signed int32 right and mask: the mask discards the sign bits the arithmetic shift brings in.
    codes = (packed.to(torch.int32).unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(dim, dim + 1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ "gemm" int32 [rows, cols / 8] → 4-bit codes [rows, cols] in column order."""
    codes = unpack_int32(packed, 4, -1).unflatten(-1, (-1, 8))
    return codes[..., list(AWQ_REVERSE_ORDER)].flatten(-2)
