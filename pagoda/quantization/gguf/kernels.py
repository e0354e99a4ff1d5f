"""Compact in-memory forms of GGUF weights (:mod:`pagoda.quantization.int_kernels` holds the kernels).

Each kernel holds one weight ``W`` [N, K] and computes ``x @ W.T`` for ``x`` [M, K] in ``x``'s dtype, and can
gather dequantized rows (for embedding tables). Which form a type gets:

- **BlockQuantKernel** (every block type, where the engine's ``linear_block_quant`` op has an implementation faster
  than its reference for the model's dtype — pagoda's AVX512-BF16 kernel for bf16 models on the CPU): the op's
  form of the codes — Q4_0/Q4_1/Q4_K as 4-bit codes with a scale and offset per 32; Q8_0, Q5_0 and Q3_K as int8
  codes with a float16 scale per 32 (:func:`dequant.int8_scaled`: 1.06 bytes a weight); Q2_K, Q6_K (per 16) and
  Q5_K, Q5_1 (per 32) as int8 codes with a float32 scale and offset per sub-block (:func:`dequant.int8_affine`,
  the op's ``prepare_affine``: 1.5 / 1.25 bytes a weight). All below bf16's 2 bytes, values equal to the file's.
- **Int4Kernel** (Q4_0, Q4_1, Q4_K; other bf16/fp16 models): torch's int4 weight-only matmul with one (scale, zero)
  per 32 values — exactly these formats' block structure (see :func:`dequant.int4_affine`). 0.5 byte per
  weight plus the scales, about the size of the file. Scales are rounded to the activation dtype.
- **Int8Kernel** (the other block types without the native op, e.g. float32 models; Q4 codes widened to int8):
  the same int8 codes with one float scale (and offset) per 16 or 32 values, run per group at decode sizes.
- **DenseOpKernel** over the engine's ``linear_dense`` (F32, F16, BF16 records: routers, gates, whole float files'
  layers and tables): in the model's dtype, as an unquantized weight is held (``make_kernel``'s ``dense_op``);
  **DenseKernel**, the tensor itself, where that op does not take the model's dtype and for float shards of a
  merged layer of mixed types.
- **RawKernel** (embedding tables of Q4 types without the native op): the file's bytes, dequantized per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from pagoda.quantization.gguf.dequant import dequantize, int4_affine, int8_affine, int8_blocks, int8_scaled
from pagoda.quantization.int_kernels import (CHUNK_ROWS, BlockQuantKernel, DenseKernel, Int4Kernel, Int8Kernel,
                                             Kernel, OpKernel, block_quant_op_for, release_freed_memory)

INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
INT8_TYPES = (T.Q8_0, T.Q6_K)
#: int8 codes with a float16 scale per 32 (Q8_0's form) and with a float32 scale and offset per sub-block
SCALED_TYPES = (T.Q5_0, T.Q3_K)
AFFINE_TYPES = (T.Q2_K, T.Q5_K, T.Q6_K, T.Q5_1)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


class RawKernel(Kernel):
    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int):
        self.raw = raw.contiguous()
        self.ggml_type = ggml_type
        self.out_features, self.in_features = raw.shape[0], in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features <= CHUNK_ROWS:
            return F.linear(x, dequantize(self.raw, self.ggml_type, x.dtype))
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start in range(0, self.out_features, CHUNK_ROWS):
            chunk = self.raw[start:start + CHUNK_ROWS]
            out[:, start:start + chunk.shape[0]] = F.linear(x, dequantize(chunk, self.ggml_type, x.dtype))
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.raw.index_select(0, flat), self.ggml_type, dtype).reshape(*ids.shape, -1)


class DenseOpKernel(OpKernel):
    """A float weight held by the engine's ``linear_dense`` op: products, logits, in-kernel argmax and row gathers
    (an embedding table that is also the LM head) all go to the op, as for an unquantized checkpoint's layers."""

    def argmax(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.op.greedy(self.handle, x, allowed)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.op.rows(self.handle, ids).to(dtype)


def make_kernel(data: torch.Tensor, ggml_type: int, shape: tuple[int, int],
                act_dtype: torch.dtype = torch.bfloat16, block_quant_op=None, dense_op=None,
                lm_head: bool = False) -> Kernel:
    """The compact kernel for a weight of ``shape`` stored as ``data`` (raw rows, or a float tensor), for a
    model computing in ``act_dtype`` (any dtype still works; this picks the fast form). ``block_quant_op`` is the
    engine's ``linear_block_quant`` implementation (see :func:`block_quant_op_for`); ``dense_op`` its ``linear_dense``
    one, which then holds float records (routers, gates, whole float files' layers and tables) in the model's dtype as
    it holds an unquantized weight, where it computes in that dtype (else torch's matmul on the tensor); ``lm_head``:
    the record also serves as the LM head, so that op prepares it as one (``prepare_lm_head``)."""
    ggml_type = T(ggml_type)
    n, k = shape
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if k % block_size:
        raise ValueError(f"{ggml_type.name} weights need rows of a multiple of {block_size} values, got {k}")
    if ggml_type in FLOAT_TYPES:
        weight = dequantize(data, ggml_type, {T.F32: torch.float32, T.F16: torch.float16,
                                              T.BF16: torch.bfloat16}[ggml_type]).reshape(n, k)
        if dense_op is not None and (dense_op.dtypes is None or act_dtype in dense_op.dtypes):
            prepare = dense_op.prepare_lm_head if lm_head else dense_op.prepare
            return DenseOpKernel(dense_op, prepare(weight.to(act_dtype), None), n, k)
        return DenseKernel(weight)
    op = block_quant_op_for(block_quant_op, k, act_dtype)
    if ggml_type in INT4_TYPES:
        codes, scale, offset = int4_affine(data, ggml_type)
        if op is not None:
            return BlockQuantKernel.from_blocks(codes, scale, offset, 4, op)
        if act_dtype != torch.float32:
            try:
                return Int4Kernel(codes, scale, offset, 32, act_dtype)
            except RuntimeError:
                pass  # a shape the int4 kernel does not take
        # float32 models: torch's int4 matmul has no fast float32 path on CPU (batch 128 costs 128x batch 1), so
        # the codes are widened to int8 (1.25 bytes per weight instead of 0.625).
        return Int8Kernel(codes.to(torch.int8), scale, 32, offset)
    if ggml_type == T.Q8_0 or ggml_type in SCALED_TYPES:
        if ggml_type == T.Q8_0:
            codes, scale, _ = int8_blocks(data, ggml_type)
        else:
            codes, scale = int8_scaled(data, ggml_type)
        if op is not None:
            return BlockQuantKernel.from_blocks(codes, scale, None, 8, op)
        return Int8Kernel(codes, scale, 32, None, torch.float16)  # float16 values: stored as such (exact)
    if ggml_type in AFFINE_TYPES:
        codes, scale, offset, group = int8_affine(data, ggml_type)
        accepts_affine = getattr(op, "accepts_affine", None)  # optional in the op's contract
        if accepts_affine is not None and accepts_affine(k, group, act_dtype):
            return BlockQuantKernel(op.prepare_affine(codes, scale, offset, group), op, n, k)
        return Int8Kernel(codes, scale, group, offset)
    return RawKernel(data, ggml_type, k)
