"""The Triton kernels of the ``linear_int8`` op (W8A8 INT8) on the CUDA platform.

A small kernel quantizes each token to int8 (symmetric, round half to even, as
:func:`~pagoda.ops.reference_quant.quantize_int8_per_token`); a second multiplies int8 by int8 into int32 and scales
each output by its token's and row's scales. Jitted on first use, as in :mod:`pagoda.platforms.cuda_quant_ops`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pagoda.platforms import cuda_quant_ops
from pagoda.platforms.cuda_quant_ops import _DTYPES, _as_rows, _cdiv, _tiles

# Bound from cuda_quant_ops on first use (see there: importing triton at registration would fix its mode too early).
tl = None
store_tile = None


def _quantize_int8_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_xm, static_scale, STATIC: tl.constexpr,
                          BLOCK: tl.constexpr):
    # One program per token: its absolute maximum, then its codes.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = static_scale
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        # div_rn: IEEE division, as torch's; Triton's default fp32 division may be approximate on GPUs.
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-10), 127.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -128.0), 127.0)
        # Adding and subtracting 1.5·2^23 rounds a float32 below 2^22 to the nearest integer, ties to even
        # (torch.round's rule), with plain adds that both the compiler and the interpreter keep.
        q = (q + 12582912.0) - 12582912.0
        tl.store(codes_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)


def _int8_matmul_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)  # exact: |sum| < 2^31 for K < 2^17
    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    store_tile(out_ptr, out, offs_m, offs_n, mask_m, mask_n, stride_om)


@functools.cache
def kernels() -> SimpleNamespace:
    """The jitted kernels (compiled, or interpreted under ``TRITON_INTERPRET=1`` at the first call)."""
    global tl, store_tile
    problem = cuda_quant_ops._import_triton()
    if problem is not None:
        raise RuntimeError(problem)
    tl, store_tile = cuda_quant_ops.tl, cuda_quant_ops.store_tile
    jit = cuda_quant_ops.triton.jit
    return SimpleNamespace(quantize_int8=jit(_quantize_int8_kernel), int8_matmul=jit(_int8_matmul_kernel))


@dataclass
class TritonInt8Weight:
    weight: torch.Tensor  # int8 [n, k]
    scale: torch.Tensor  # float32 [n]
    input_scale: float | None


def quantize_int8(x2: torch.Tensor, input_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes [m, k] and float32 scales [m] of the rows of ``x2`` (or codes of one static scale)."""
    m, k = x2.shape
    codes = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        kernels().quantize_int8[(m,)](x2, codes, scale, k, x2.stride(0),
                                      1.0 if input_scale is None else float(input_scale),
                                      STATIC=input_scale is not None,
                                      BLOCK=min(1024, 1 << (k - 1).bit_length()))
    return codes, scale


class TritonInt8(cuda_quant_ops._TritonLinear):
    op = "linear_int8"

    def accepts(self, in_features: int, act_dtype: torch.dtype) -> bool:
        return act_dtype in _DTYPES

    def prepare(self, weight, scale, input_scale=None) -> TritonInt8Weight:
        if weight.dtype != torch.int8 or scale.shape != (weight.shape[0],):
            raise ValueError(f"INT8 weights need int8 [n, k] codes and a scale per row [n]; got {weight.dtype} "
                             f"{tuple(weight.shape)} and scale {tuple(scale.shape)}")
        return TritonInt8Weight(weight.contiguous(), scale.float().contiguous(), input_scale)

    def _matmul(self, handle: TritonInt8Weight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        n, k = handle.weight.shape
        x2 = _as_rows(x, k)
        m = x2.shape[0]
        codes, token_scale = quantize_int8(x2, handle.input_scale)
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
        if m:
            bm, bn, bk = _tiles(m)
            kernels().int8_matmul[(_cdiv(m, bm), _cdiv(n, bn))](
                codes, token_scale, handle.weight, handle.scale, out, m, n, k, out.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return out.reshape(*x.shape[:-1], n)

    def nbytes(self, handle):
        return handle.weight.numel() + handle.scale.numel() * 4


CUDA_INT8_OP_IMPLS = [TritonInt8]
