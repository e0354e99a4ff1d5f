"""Compact in-memory forms of GGUF weights and the CPU matmuls over them.

Each kernel holds one weight ``W`` [N, K] and computes ``x @ W.T`` for ``x`` [M, K] in ``x``'s dtype, and can
gather dequantized rows (for embedding tables). Which form a type gets:

- **BlockQuantKernel** (Q4_0, Q4_1, Q4_K, Q8_0, where the engine's ``linear_block_quant`` op has an
  implementation faster than its reference for the model's dtype — pagoda's AVX512-BF16 kernel for bf16 models on
  the CPU): the op's form of the codes with a scale (and offset) per 32 values.
- **Int4Kernel** (Q4_0, Q4_1, Q4_K; other bf16/fp16 models): torch's int4 weight-only matmul with one (scale, zero)
  per 32 values — exactly these formats' block structure (see :func:`dequant.int4_affine`). 0.5 byte per
  weight plus the scales, about the size of the file. Scales are rounded to the activation dtype.
- **Int4AsInt8Kernel** (the same types, float32 models): codes widened to int8, run like Int8Kernel.
- **Int8Kernel** (Q8_0, Q6_K): signed int8 codes with one float scale per 32 (Q8_0) or 16 (Q6_K) values,
  stored group-major ``[K/g, N, g]``. Decode-sized batches run one ``_weight_int8pack_mm`` per group (reads
  each weight byte once: memory-bound like a dense matmul, at half the bytes of bf16); larger batches
  dequantize chunks of rows to the activation dtype and use a dense matmul (compute-bound anyway).
- **DenseKernel** (F32, F16, BF16): the tensor itself.
- **RawKernel** (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K): the file's bytes; dequantized chunk by chunk on each call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from pagoda.quantization.gguf.dequant import dequantize, int4_affine, int8_blocks

INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
INT8_TYPES = (T.Q8_0, T.Q6_K)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Rows dequantized at a time by the chunked paths: bounds the temporary to ~16 MB at K = 1024 in float32.
_CHUNK_ROWS = 4096
# Batches up to this size take the per-group int8 path; above it, dequantize + dense matmul wins.
_INT8_DECODE_MAX_M = 4


class Kernel:
    """A weight ``[out_features, in_features]`` in a compact form."""

    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, in_features] → ``x @ W.T`` [M, out_features] in ``x.dtype``."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``W[ids]`` dequantized to ``dtype``."""
        raise NotImplementedError

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in float32 (logits); kernels that can skip the round trip through ``x.dtype`` override it."""
        return self.matmul(x).float()

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(x @ W.T).argmax(-1)`` without writing the product out, where the kernel can (else None)."""
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.__dict__.values() if isinstance(t, torch.Tensor))


class DenseKernel(Kernel):
    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype:
            # A model runs in one dtype: convert once and keep only the converted copy.
            self.weight = self.weight.to(x.dtype)
        return F.linear(x, self.weight)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(dtype)


class RawKernel(Kernel):
    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int):
        self.raw = raw.contiguous()
        self.ggml_type = ggml_type
        self.out_features, self.in_features = raw.shape[0], in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features <= _CHUNK_ROWS:
            return F.linear(x, dequantize(self.raw, self.ggml_type, x.dtype))
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start in range(0, self.out_features, _CHUNK_ROWS):
            chunk = self.raw[start:start + _CHUNK_ROWS]
            out[:, start:start + chunk.shape[0]] = F.linear(x, dequantize(chunk, self.ggml_type, x.dtype))
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.raw.index_select(0, flat), self.ggml_type, dtype).reshape(*ids.shape, -1)


class BlockQuantKernel(Kernel):
    """4-bit (Q4_0/Q4_1/Q4_K) or 8-bit (Q8_0) codes with a scale (and offset) per 32 values, multiplied by the
    ``linear_block_quant`` op."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, op):
        if ggml_type in INT4_TYPES:
            codes, scale, offset = int4_affine(raw, ggml_type)
            self.handle = op.prepare(codes, scale, offset, 4)
        else:
            codes, scale, _ = int8_blocks(raw, ggml_type)
            self.handle = op.prepare(codes, scale, None, 8)
        self.op = op
        self.out_features, self.in_features = codes.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply(self.handle, x)

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.logits(self.handle, x)  # no round trip through the activation dtype

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.op.greedy(self.handle, x)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.op.rows(self.handle, ids, dtype)

    def nbytes(self) -> int:
        return self.op.nbytes(self.handle)


def block_quant_op_for(op, in_features: int, act_dtype: torch.dtype):
    """``op`` (the engine's ``linear_block_quant``) when it is a faster implementation than the reference that takes
    these weights; None when GGUF's own torch forms below serve better."""
    if op is None or op.is_reference or not op.accepts(in_features, act_dtype):
        return None
    return op


class Int4Kernel(Kernel):
    """Q4 formats for bf16/fp16 models: torch's int4 weight-only matmul, ``w = (q - 8)·scale + zero``."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int, act_dtype: torch.dtype):
        codes, scale, offset = int4_affine(raw, ggml_type)
        self.out_features, self.in_features = codes.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # [K/32, N, 2] in the model's dtype (the kernel wants the activation dtype): 0.125 byte per weight in bf16.
        self.scale_zero = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(act_dtype).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_zero.dtype != x.dtype:
            self.scale_zero = self.scale_zero.to(x.dtype)  # a model runs in one dtype: convert once
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, 32, self.scale_zero)


class Int8Kernel(Kernel):
    """``w = code·scale (+ offset)`` per group of ``g`` values, int8 codes stored group-major [K/g, N, g]."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int):
        codes, scale, group = int8_blocks(raw, ggml_type)
        # Q8_0 scales are fp16 values: store them as such (exact); Q6_K's d·sc products need float32.
        self._setup(codes, scale, group, None, torch.float16 if ggml_type == T.Q8_0 else torch.float32)

    def _setup(self, codes, scale, group, offset, scale_dtype) -> None:
        self.group = group
        self.out_features, self.in_features = codes.shape
        groups = self.in_features // group
        self.codes = codes.reshape(self.out_features, groups, group).transpose(0, 1).contiguous()  # [G, N, g]
        self.scale = scale.t().contiguous().to(scale_dtype)  # [G, N]
        self.offset = None if offset is None else offset.t().contiguous()  # [G, N] float32
        self._ones: dict[torch.dtype, torch.Tensor] = {}

    def _dequant(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes[:, start:stop].to(torch.float32)
        scale = self.scale[:, start:stop, None].to(torch.float32)
        w = codes * scale if self.offset is None else torch.addcmul(self.offset[:, start:stop, None], codes, scale)
        return w.transpose(0, 1).reshape(stop - start, self.in_features).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= _INT8_DECODE_MAX_M:
            return self._matmul_grouped(x)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start in range(0, self.out_features, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, self.out_features)
            out[:, start:stop] = F.linear(x, self._dequant(start, stop, x.dtype))
        return out

    def _matmul_grouped(self, x: torch.Tensor) -> torch.Tensor:
        ones = self._ones.get(x.dtype)
        if ones is None:
            ones = self._ones[x.dtype] = torch.ones(self.out_features, dtype=x.dtype)
        # Accumulate in float32: partial sums of up to K/g groups would lose bits in bf16.
        xg = x.reshape(x.shape[0], -1, self.group)
        scale = self.scale.to(torch.float32)
        out = torch.zeros(x.shape[0], self.out_features, dtype=torch.float32)
        for g in range(self.codes.shape[0]):
            part = torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), self.codes[g], ones)
            out.addcmul_(part.float(), scale[g])
        if self.offset is not None:
            # sum_g offset[g, n] * sum(x in group g): the constant part of each group's weights
            out.addmm_(xg.float().sum(-1), self.offset)
        return out.to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = self.codes.index_select(1, flat).to(torch.float32)  # [G, n, g]
        scale = self.scale.index_select(1, flat)[..., None].to(torch.float32)
        w = codes * scale if self.offset is None else torch.addcmul(self.offset.index_select(1, flat)[..., None],
                                                                   codes, scale)
        return w.transpose(0, 1).reshape(*ids.shape, self.in_features).to(dtype)


class Int4AsInt8Kernel(Int8Kernel):
    """Q4 formats for float32 models. torch's int4 matmul has no fast float32 path on CPU (batch 128 costs 128×
    batch 1), so the 4-bit codes are widened to int8 with float32 scale and offset per 32 values (1.25 bytes per
    weight instead of 0.625): the per-group int8 matmul at decode, dequantize + float32 matmul above."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int):
        codes, scale, offset = int4_affine(raw, ggml_type)
        self._setup(codes.to(torch.int8), scale, 32, offset, torch.float32)


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Repacking frees large temporaries (int32 codes: 4 bytes per
    weight); after the first few, glibc raises its mmap threshold and keeps later ones on the heap, which would
    leave resident memory at ~2.5x the file size after loading instead of ~1.1x."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def make_kernel(data: torch.Tensor, ggml_type: int, shape: tuple[int, int],
                act_dtype: torch.dtype = torch.bfloat16, block_quant_op=None) -> Kernel:
    """The compact kernel for a weight of ``shape`` stored as ``data`` (raw rows, or a float tensor), for a
    model computing in ``act_dtype`` (any dtype still works; this picks the fast form). ``block_quant_op`` is the
    engine's ``linear_block_quant`` implementation (see :func:`block_quant_op_for`)."""
    ggml_type = T(ggml_type)
    n, k = shape
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if k % block_size:
        raise ValueError(f"{ggml_type.name} weights need rows of a multiple of {block_size} values, got {k}")
    if ggml_type in FLOAT_TYPES:
        return DenseKernel(dequantize(data, ggml_type, {T.F32: torch.float32, T.F16: torch.float16,
                                                        T.BF16: torch.bfloat16}[ggml_type]).reshape(n, k))
    op = block_quant_op_for(block_quant_op, k, act_dtype)
    if (ggml_type in INT4_TYPES or ggml_type == T.Q8_0) and op is not None:
        return BlockQuantKernel(data, ggml_type, op)
    if ggml_type in INT4_TYPES and act_dtype == torch.float32:
        return Int4AsInt8Kernel(data, ggml_type, k)
    if ggml_type in INT4_TYPES:
        try:
            return Int4Kernel(data, ggml_type, k, act_dtype)
        except RuntimeError:
            pass  # a shape the int4 kernel does not take: fall back to dequantizing on the fly
    if ggml_type in INT8_TYPES:
        return Int8Kernel(data, ggml_type, k)
    return RawKernel(data, ggml_type, k)
