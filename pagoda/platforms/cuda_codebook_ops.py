"""A Triton kernel for the ``linear_codebook`` op (AQLM) on the CUDA platform.

Each program multiplies a tile of rows by a tile of outputs: per block of inputs it reads the outputs' codes,
gathers each code's codebook entry (8 inputs of one output) from its shard's books, sums the books, scales each
output and feeds the tile to ``tl.dot``. The dense weight never exists in memory; codes stay as compact as the
checkpoint's (uint8 for books of up to 256 entries, 16-bit otherwise) and books as float16 where the checkpoint's
are float16 values. Shapes the kernel does not take (an output group other than 1, an input group other than 8)
keep the reference's form.

Like :mod:`pagoda.platforms.cuda_quant_ops`, the kernel is jitted on first use, and runs in Triton's interpreter
where ``TRITON_INTERPRET=1`` (the tests, on the CPU), with float32 dots there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagoda.ops import reference_quant
from pagoda.platforms import cuda_quant_ops
from pagoda.platforms.cuda_quant_ops import _as_rows, _cdiv, _dot_fp32, _tiles

# Bound from cuda_quant_ops on first use (see there: importing triton at registration would fix its mode too early).
tl = None
dot_tile = store_tile = None

IN_GROUP = 8  # inputs per code: every AQLM scheme vLLM served (1x16, 2x8, …)
_REFERENCE = reference_quant.LinearCodebook()


def _codebook_kernel(x_ptr, codes_ptr, books_ptr, shard_ptr, scale_ptr, out_ptr, M, N, K, book_size, stride_xm,
                     stride_om, NUM_BOOKS: tl.constexpr, CODE_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    groups = K // 8
    # Entry 0 of book 0 of each output's shard (books are [shards][books][book_size][8]).
    book0 = tl.load(shard_ptr + offs_n, mask=mask_n, other=0).to(tl.int64) * NUM_BOOKS * book_size
    code_rows = offs_n.to(tl.int64)[None, :] * groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        code_at = (code_rows + (offs_k // 8)[:, None]) * NUM_BOOKS
        w = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
        for b in tl.static_range(NUM_BOOKS):
            code = tl.load(codes_ptr + code_at + b, mask=w_mask, other=0).to(tl.int32) & CODE_MASK
            entry = (book0[None, :] + b * book_size + code.to(tl.int64)) * 8 + (offs_k % 8)[:, None]
            w += tl.load(books_ptr + entry, mask=w_mask, other=0.0).to(tl.float32)
        w = w * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        acc = dot_tile(acc, x, w, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om)


@functools.cache
def kernel():
    """The jitted kernel (compiled, or interpreted under ``TRITON_INTERPRET=1`` at the first call)."""
    global tl, dot_tile, store_tile
    problem = cuda_quant_ops._import_triton()
    if problem is not None:
        raise RuntimeError(problem)
    tl, dot_tile, store_tile = cuda_quant_ops.tl, cuda_quant_ops.dot_tile, cuda_quant_ops.store_tile
    return cuda_quant_ops.triton.jit(_codebook_kernel)


@dataclass
class TritonCodebookWeight:
    codes: torch.Tensor  # [n, k / 8, num_books]: uint8 (books of up to 256 entries) or int16 (the 16 bits of a code)
    books: torch.Tensor  # [shards, num_books, book_size, 8]: float16 where exact, else float32
    shard: torch.Tensor  # int32 [n]: each output's shard
    scales: torch.Tensor  # float32 [n]
    n: int
    k: int


class TritonCodebook(cuda_quant_ops._TritonLinear):
    op = "linear_codebook"

    def prepare(self, codes, codebooks, scales, shard_sizes=None):
        books, sizes = reference_quant.codebook_shards(codes, codebooks, shard_sizes)
        shards, num_books, book_size, out_group, in_group = books.shape
        if out_group != 1 or in_group != IN_GROUP or book_size > 1 << 16:
            return _REFERENCE.prepare(codes, codebooks, scales, shard_sizes)
        n, k = codes.shape[0], codes.shape[1] * IN_GROUP
        compact = codes.to(torch.int32) & 0xFFFF
        if book_size <= 256:
            compact = compact.to(torch.uint8)
        else:  # the low 16 bits, as int16 (two's complement); the kernel masks them back
            compact = torch.where(compact >= 1 << 15, compact - (1 << 16), compact).to(torch.int16)
        books = books.squeeze(3)
        exact = torch.equal(books.half().float(), books.float())
        books = (books.half() if exact else books.float()).contiguous()
        shard = torch.repeat_interleave(torch.arange(shards, dtype=torch.int32, device=codes.device),
                                        torch.tensor(sizes, device=codes.device))
        return TritonCodebookWeight(compact.contiguous(), books, shard, scales.float().reshape(-1).contiguous(), n, k)

    def _matmul(self, handle, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(handle, TritonCodebookWeight):
            return _REFERENCE.logits(handle, x) if out_dtype == torch.float32 else _REFERENCE.apply(handle, x)
        x2 = _as_rows(x, handle.k)
        m = x2.shape[0]
        out = torch.empty(m, handle.n, dtype=out_dtype, device=x.device)
        if m:
            bm, bn, bk = _tiles(m)
            mask = 0xFF if handle.codes.dtype == torch.uint8 else 0xFFFF
            kernel()[(_cdiv(m, bm), _cdiv(handle.n, bn))](
                x2, handle.codes, handle.books, handle.shard, handle.scales, out, m, handle.n, handle.k,
                handle.books.shape[2], x2.stride(0), out.stride(0), NUM_BOOKS=handle.books.shape[1], CODE_MASK=mask,
                DOT_FP32=_dot_fp32(x2, out_dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return out.reshape(*x.shape[:-1], handle.n)

    def nbytes(self, handle):
        if not isinstance(handle, TritonCodebookWeight):
            return _REFERENCE.nbytes(handle)
        return sum(t.numel() * t.element_size() for t in (handle.codes, handle.books, handle.shard, handle.scales))


CUDA_CODEBOOK_OP_IMPLS = [TritonCodebook]
