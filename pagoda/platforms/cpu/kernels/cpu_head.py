"""The greedy LM head: the argmax of ``x @ W.T`` without writing the logits out (:func:`linear_argmax`, the full pass
over a packed bf16 or block-quantized weight), and that argmax screened by an int8 copy of a bf16 head
(``csrc/cpu_head.h``): the full pass's answer, bit for bit, from about half the bytes and multiply-adds.

A greedy head multiplies the whole bf16 matrix to find one column per row. The screen multiplies an int8 copy instead
(one code per weight, a scale per column) by the rows quantized to int8 (their few largest channels in float) and
bounds, per column, how far that product can be from the exact one; only the columns whose bounds reach the best
column's lower bound are multiplied exactly. The copy costs half the head's bf16 bytes again. The bound terms are
computed here once and rounded up.
"""

from __future__ import annotations

import torch

from pagoda.platforms.cpu.kernels.cpu import kernels
from pagoda.platforms.cpu.kernels.cpu_ops import PackedQuant, PackedWeight, _bf16_rows, _check, _threads
from pagoda.platforms.cpu.kernels.cpu_quant_ops import PackedInt8

_UNIT_ROUNDOFF = 2.0 ** -24
_ROUND_UP = 1.0 + 1e-6  # covers float32 rounding of the bound terms (relative 6e-8) and their products in the kernel
_CHUNK_ROWS = 8192  # columns of the head prepared at a time, bounding the working set
#: int32 sums of 255 x 127 products stay exact up to here.
MAX_K = 65536


class HeadScreen:
    """The int8 copy of a head [n, k] (:class:`PackedInt8`) and each column's bound terms, rounded up: ``err`` =
    |w - w~|, ``qnorm`` = |w~| and ``sum_err`` = (g_k + 16u) |w| (g_k the float32 summation bound of a k-term dot
    product, 16u that of the outlier channels' float sums)."""

    __slots__ = ("int8", "err", "qnorm", "sum_err", "max_col_norm")

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        u = _UNIT_ROUNDOFF
        gamma = k * u / (1 - k * u)
        codes = torch.empty(n, k, dtype=torch.int8)
        scale = torch.empty(n, dtype=torch.float32)
        err, qnorm, wnorm = (torch.empty(n, dtype=torch.float32) for _ in range(3))
        for start in range(0, n, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            w = weight[rows].float()  # exact
            s = w.abs().amax(1) / 127
            s = torch.where(s > 0, s, torch.ones_like(s))  # the float32 scale the kernel multiplies by
            c = torch.round(w / s[:, None]).clamp_(-127, 127)
            approx = c * s[:, None]
            codes[rows], scale[rows] = c.to(torch.int8), s
            wnorm[rows] = torch.linalg.vector_norm(w, dim=1)
            qnorm[rows] = torch.linalg.vector_norm(approx, dim=1)
            err[rows] = torch.linalg.vector_norm(w - approx, dim=1)
        # In float32 the products c s and the differences w - c s are off by at most 2u (|w| + |w - c s|) per weight,
        # and a norm of k squares by a relative g_k: 4u |w| and a factor 1 + 2 g_k cover both.
        up = 1 + 2 * gamma + 1e-6
        wnorm = wnorm.double() * up
        self.int8 = PackedInt8(codes, scale)
        self.err = ((err.double() + 4 * u * wnorm) * up).float()
        self.qnorm = (qnorm.double() * up).float()
        self.sum_err = (wnorm * ((gamma + 16 * u) * _ROUND_UP)).float()
        self.max_col_norm = max(float(wnorm.max()), float(self.qnorm.max())) * _ROUND_UP if n else 0.0

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
                    allowed: torch.Tensor | None = None, amx: bool = False) -> torch.Tensor:
    """``(x @ W.T).argmax(-1)`` exactly as the full pass gives it, through the screen; ``allowed`` and ``amx`` as
    for :func:`linear_argmax` (where the full pass would multiply on AMX tiles, it runs instead)."""
    x2 = _bf16_rows(x, weight.k, "screened_argmax")
    allowed = allowed_words(allowed, x2.shape[0], weight.n, "screened_argmax")
    out = torch.empty(x2.shape[0], dtype=torch.int64)
    if x2.shape[0]:
        _check(kernels().screened_argmax(x2.data_ptr(), weight.ptrs[0], screen.int8.ptr, screen.err.data_ptr(),
                                         screen.qnorm.data_ptr(), screen.sum_err.data_ptr(), screen.max_col_norm,
                                         x2.shape[0], weight.n, weight.k, out.data_ptr(), _threads(), int(amx),
                                         None if allowed is None else allowed.data_ptr()),
               "pagoda_screened_argmax")
    return out


def allowed_words(allowed: torch.Tensor | None, rows: int, n: int, op: str) -> torch.Tensor | None:
    """A token bitmask for ``rows`` rows of ``n`` columns as the argmax kernels read it (contiguous int32 words),
    checked for its shape."""
    if allowed is None:
        return None
    allowed = allowed.to(torch.int32).contiguous()
    if tuple(allowed.shape) != (rows, (n + 31) // 32):
        raise ValueError(f"{op}: allowed must be [{rows}, {(n + 31) // 32}] int32 words, got {list(allowed.shape)}")
    return allowed


def linear_argmax(x: torch.Tensor, weight: PackedWeight | PackedQuant, amx: bool = False,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ W.T).argmax(-1)`` for bf16 ``x`` [rows, k] and a packed weight, without writing the logits out
    (torch's rules: the first maximum, a NaN wins). A greedy LM head. ``amx``: bf16 weights on AMX tiles from 8
    rows (only where the process may use them). ``allowed``: a token bitmask per row (int32 [rows, ceil(n / 32)],
    bit ``t % 32`` of word ``t // 32`` set: token ``t`` allowed); the argmax is then over the allowed tokens. A bf16
    weight prepared as an LM head (with a :class:`HeadScreen`) is screened: the same answer, from fewer bytes."""
    if isinstance(weight, PackedWeight) and weight.screen is not None:
        return screened_argmax(x, weight, weight.screen, allowed, amx)
    x2 = _bf16_rows(x, weight.k, "linear_argmax")
    allowed = allowed_words(allowed, x2.shape[0], weight.n, "linear_argmax")
    out = torch.empty(x2.shape[0], dtype=torch.int64)
    if isinstance(weight, PackedWeight):
        kind, ptr = 0, weight.ptrs[0]
        if weight.bias is not None:
            raise ValueError("linear_argmax takes weights without bias")
    else:
        kind, ptr = weight.bits, weight.ptr
    if x2.shape[0]:
        _check(kernels().linear_argmax(kind, x2.data_ptr(), ptr, x2.shape[0], weight.n, weight.k, out.data_ptr(),
                                       _threads(), int(amx), None if allowed is None else allowed.data_ptr()),
               "pagoda_linear_argmax")
    return out
