"""The greedy LM head screened by an int8 copy of its weight (``csrc/cpu_head.h``): the full pass's argmax, bit for
bit, from about half the bytes and multiply-adds.

A greedy head multiplies the whole bf16 matrix to find one column per row. The screen multiplies an int8 copy instead
(one code per weight, a scale per column) by the rows quantized to int8 (their few largest channels in float) and
bounds, per column, how far that product can be from the exact one; only the columns whose bounds reach the best
column's lower bound are multiplied exactly. The copy costs half the head's bf16 bytes again. The bound terms are
computed here once, in float64, and rounded up.
"""

from __future__ import annotations

import torch

from pagoda.platforms.cpu.kernels.cpu import kernels
from pagoda.platforms.cpu.kernels.cpu_ops import PackedWeight, _bf16_rows, _check, _threads
from pagoda.platforms.cpu.kernels.cpu_quant_ops import PackedInt8

_UNIT_ROUNDOFF = 2.0 ** -24
_ROUND_UP = 1.0 + 1e-6  # covers float32 rounding of the bound terms (relative 6e-8) and their products in the kernel
_CHUNK_ROWS = 8192  # columns of the head prepared at a time, bounding the float64 working set
#: int32 sums of 255 x 127 products stay exact up to here.
MAX_K = 65536


class HeadScreen:
    """The int8 copy of a head [n, k] (:class:`PackedInt8`) and each column's bound terms, rounded up: ``err`` =
    |w - w~|, ``qnorm`` = |w~| and ``sum_err`` = (g_k + 16u) |w| (g_k the float32 summation bound of a k-term dot
    product, 16u that of the outlier channels' float sums)."""

    __slots__ = ("int8", "err", "qnorm", "sum_err", "max_col_norm")

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        gamma = k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)
        codes = torch.empty(n, k, dtype=torch.int8)
        scale = torch.empty(n, dtype=torch.float32)
        err = torch.empty(n, dtype=torch.float64)
        qnorm = torch.empty(n, dtype=torch.float64)
        wnorm = torch.empty(n, dtype=torch.float64)
        col_norm = 0.0
        for start in range(0, n, _CHUNK_ROWS):
            w = weight[start:start + _CHUNK_ROWS].double()
            s = (w.abs().amax(1) / 127).float()
            s = torch.where(s > 0, s, torch.ones_like(s))  # the float32 scale the kernel multiplies by
            c = torch.round(w / s.double()[:, None]).clamp_(-127, 127)
            approx = c * s.double()[:, None]
            norms = w.norm(dim=1)
            codes[start:start + _CHUNK_ROWS] = c.to(torch.int8)
            scale[start:start + _CHUNK_ROWS] = s
            err[start:start + _CHUNK_ROWS] = (w - approx).norm(dim=1)
            wnorm[start:start + _CHUNK_ROWS] = norms
            qnorm[start:start + _CHUNK_ROWS] = approx.norm(dim=1)
            col_norm = max(col_norm, float(norms.max()), float(qnorm[start:start + _CHUNK_ROWS].max()))
        self.int8 = PackedInt8(codes, scale)
        self.err = (err * _ROUND_UP).float()
        self.qnorm = (qnorm * _ROUND_UP).float()
        self.sum_err = (wnorm * ((gamma + 16 * _UNIT_ROUNDOFF) * _ROUND_UP)).float()
        self.max_col_norm = col_norm * _ROUND_UP

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.int8.data, self.err, self.qnorm, self.sum_err))


def head_screen(weight: torch.Tensor) -> HeadScreen | None:
    """The screen of a bf16 head [n, k], or None where the kernels or the weight don't allow one (a build without
    AVX512-VNNI, a non-finite weight, ``k`` past :data:`MAX_K`)."""
    lib = kernels()
    if lib is None or not lib.has_vnni_int8 or weight.shape[1] > MAX_K or not bool(torch.isfinite(weight).all()):
        return None
    return HeadScreen(weight)


def screened_argmax(x: torch.Tensor, weight: PackedWeight, screen: HeadScreen,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ W.T).argmax(-1)`` exactly as :func:`cpu_ops.linear_argmax` gives it (without AMX), through the screen;
    ``allowed`` as there."""
    x2 = _bf16_rows(x, weight.k, "screened_argmax")
    if allowed is not None:
        allowed = allowed.to(torch.int32).contiguous()
        if tuple(allowed.shape) != (x2.shape[0], (weight.n + 31) // 32):
            raise ValueError(f"screened_argmax: allowed must be [{x2.shape[0]}, {(weight.n + 31) // 32}] int32 "
                             f"words, got {list(allowed.shape)}")
    out = torch.empty(x2.shape[0], dtype=torch.int64)
    if x2.shape[0]:
        _check(kernels().screened_argmax(x2.data_ptr(), weight.ptrs[0], screen.int8.ptr, screen.err.data_ptr(),
                                         screen.qnorm.data_ptr(), screen.sum_err.data_ptr(), screen.max_col_norm,
                                         x2.shape[0], weight.n, weight.k, out.data_ptr(), _threads(),
                                         None if allowed is None else allowed.data_ptr()),
               "pagoda_screened_argmax")
    return out
