"""Integer-coded weights in compact form, and the matmuls over them.

Every integer weight format (GGUF's Q4/Q8 blocks, AWQ, GPTQ, compressed-tensors' packed ints) comes down to the
same *affine* form: ``w[n, k] = code[n, k] * scale[n, k // g] + offset[n, k // g]`` with small integer codes and
one scale (and offset) per group of ``g`` inputs; the checkpoint formats store the offset as a zero point,
``offset = -zero * scale``. A format decodes its own packing into that form once, after
loading, and :func:`affine_kernel` picks the compact kernel that multiplies by it:

- **BlockQuantKernel** (4- or 8-bit codes with zero points, or 8-bit codes without, in groups of a multiple of 32,
  where the engine's ``linear_block_quant`` op has an implementation faster than its reference for the model's
  dtype — pagoda's AVX512-BF16 kernel for bf16 models on the CPU — and takes them): the op's form (on the CPU, the
  checkpoint's own float16 scales and zeros per group, so the weight stays the size of the file).
- **OffsetBlockQuantKernel** (8-bit codes with zero points, where the op takes only plain 8-bit codes): the op's
  8-bit form and a small product over each group's input sum for the offsets.
- **Int4Kernel** (4-bit, groups of 32 … 256, other bf16/fp16 models): torch's int4 weight-only matmul.
- **Int8Kernel** (everything else: float32 models, groups that are not a multiple of 32): int8 codes
  stored group-major ``[K/g, N, g]``; decode-sized batches run one ``_weight_int8pack_mm`` per group (each weight
  byte read once), larger ones dequantize chunks of rows and use a dense matmul (compute-bound anyway).

Each kernel computes ``x @ W.T`` for ``x`` [M, K] in ``x``'s dtype and gathers dequantized rows (embedding
tables). No kernel dequantizes a whole weight for a decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows dequantized at a time by the chunked paths: bounds the temporary to ~16 MB at K = 1024 in float32.
CHUNK_ROWS = 4096
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

    def argmax(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(x @ W.T).argmax(-1)`` without writing the product out, where the kernel can (else None); over the
        tokens a bitmask ``allowed`` allows, where given."""
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


class BlockQuantKernel(Kernel):
    """4-bit codes with a scale and offset, or 8-bit codes with a float16-exact scale, per 32 values, multiplied by
    the ``linear_block_quant`` op."""

    def __init__(self, handle, op, out_features: int, in_features: int):
        self.handle, self.op = handle, op
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                    op) -> BlockQuantKernel:
        return cls(op.prepare(codes, scale, offset, bits), op, *codes.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply(self.handle, x)

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.logits(self.handle, x)  # no round trip through the activation dtype

    def argmax(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.op.greedy(self.handle, x, allowed)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.op.rows(self.handle, ids, dtype)

    def nbytes(self) -> int:
        return self.op.nbytes(self.handle)


class OffsetBlockQuantKernel(Kernel):
    """8-bit codes with an offset per group (zero points other than the codes' middle: asymmetric GPTQ, W8A16
    asym): ``w = code·scale + offset`` is multiplied as ``x · (code·scale)ᵀ`` by the op's 8-bit form plus
    ``Σ_g sum(x in group g) · offset[:, g]``, a product over the K / group group sums. Half the bytes of the op's
    affine form (a float32 scale and offset per 32), so the weight stays within a tenth of the file's size."""

    def __init__(self, codes: BlockQuantKernel, offset: torch.Tensor, group: int):
        self.codes, self.group = codes, group
        self.offset = offset.float().contiguous()  # [N, K / group]
        self.out_features, self.in_features = codes.out_features, codes.in_features

    def _with_offset(self, x: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        sums = x.float().reshape(x.shape[0], -1, self.group).sum(-1)
        return product.addmm_(sums, self.offset.t())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul_float(x).to(x.dtype)

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_offset(x, self.codes.matmul_float(x))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        offset = self.offset[ids.reshape(-1)].repeat_interleave(self.group, -1)
        w = self.codes.rows(ids, torch.float32).reshape(-1, self.in_features) + offset
        return w.reshape(*ids.shape, self.in_features).to(dtype)

    def nbytes(self) -> int:
        return self.codes.nbytes() + self.offset.numel() * self.offset.element_size()


class OpKernel(Kernel):
    """A weight held as an op's prepared handle (``linear_fp8``, ``linear_int8``, ``linear_codebook`` …): every call
    goes to that op."""

    def __init__(self, op, handle, out_features: int, in_features: int):
        self.op, self.handle = op, handle
        self.out_features, self.in_features = out_features, in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply(self.handle, x)

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.logits(self.handle, x)

    def nbytes(self) -> int:
        return self.op.nbytes(self.handle)


def block_quant_op_for(op, in_features: int, act_dtype: torch.dtype):
    """``op`` (the engine's ``linear_block_quant``) when it is a faster implementation than the reference that takes
    these weights; None when the torch forms below serve better."""
    if op is None or op.is_reference or not op.accepts(in_features, act_dtype):
        return None
    return op


class Int4Kernel(Kernel):
    """4-bit codes for bf16/fp16 models: torch's int4 weight-only matmul, ``w = (q - 8)·scale + zero``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
                 act_dtype: torch.dtype):
        self.out_features, self.in_features = codes.shape
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # [K/g, N, 2] in the model's dtype (the kernel wants the activation dtype).
        self.scale_zero = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(act_dtype).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_zero.dtype != x.dtype:
            self.scale_zero = self.scale_zero.to(x.dtype)  # a model runs in one dtype: convert once
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, self.scale_zero)


class Int8Kernel(Kernel):
    """``w = code·scale (+ offset)`` per group of ``g`` values, int8 codes stored group-major [K/g, N, g]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group: int, offset: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float32):
        self.group = group
        self.out_features, self.in_features = codes.shape
        groups = self.in_features // group
        self.codes = codes.reshape(self.out_features, groups, group).transpose(0, 1).contiguous()  # [G, N, g]
        self.scale = scale.t().contiguous().to(scale_dtype)  # [G, N]
        self.offset = None if offset is None else offset.t().contiguous().float()  # [G, N]
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
        for start in range(0, self.out_features, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.out_features)
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


class PermutedKernel(Kernel):
    """A kernel over the weight's input columns in another order (GPTQ's act-order): ``x`` is permuted to match,
    so the groups the kernel sees are contiguous."""

    def __init__(self, inner: Kernel, perm: torch.Tensor):
        self.inner, self.perm = inner, perm
        self.out_features, self.in_features = inner.out_features, inner.in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.matmul(x.index_select(-1, self.perm))

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.matmul_float(x.index_select(-1, self.perm))

    def argmax(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.inner.argmax(x.index_select(-1, self.perm), allowed)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        inverse = torch.empty_like(self.perm)
        inverse[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return self.inner.rows(ids, dtype).index_select(-1, inverse)

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.perm.numel() * self.perm.element_size()


def _per32(values: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group values repeated to per-32 values (``group`` a multiple of 32)."""
    return values if group == 32 else values.repeat_interleave(group // 32, dim=1)


def affine_kernel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, bits: int,
                  act_dtype: torch.dtype, block_quant_op=None) -> Kernel:
    """The compact kernel for ``w = (codes - zero) * scale`` (``codes`` [N, K]: 0..15 for 4 bits, int8 for 8;
    ``scale``/``zero`` [N, K / group] float32, ``zero`` None for 0) for a model computing in ``act_dtype``;
    ``block_quant_op`` is the engine's ``linear_block_quant`` implementation."""
    n, k = codes.shape
    if k % group or scale.shape != (n, k // group) or (zero is not None and zero.shape != scale.shape):
        raise ValueError(f"affine weight: codes {tuple(codes.shape)} with group {group} need scales of shape "
                         f"{(n, k // group)}, got {tuple(scale.shape)}")
    op = block_quant_op_for(block_quant_op, k, act_dtype)
    accepts_zero = getattr(op, "accepts_zero", None)  # optional in the op's contract
    # 8-bit codes without zero points keep the op's plain 8-bit form below (a float16 scale per 32)
    if op is not None and (bits == 4 or zero is not None) and accepts_zero is not None \
            and accepts_zero(k, group, act_dtype, bits):
        zero = torch.zeros_like(scale) if zero is None else zero
        codes = codes.to(torch.uint8 if bits == 4 else torch.int8)
        return BlockQuantKernel(op.prepare_zero(codes, scale, zero, group, bits), op, n, k)
    offset = None if zero is None else -(zero * scale)
    if op is not None and group % 32 == 0 and bits == 8 \
            and torch.equal(scale.to(torch.float16).float(), scale.float()):
        kernel = BlockQuantKernel.from_blocks(codes.to(torch.int8), _per32(scale, group), None, 8, op)
        return kernel if offset is None else OffsetBlockQuantKernel(kernel, offset, group)
    if bits == 4 and act_dtype != torch.float32 and offset is not None and group in (32, 64, 128, 256):
        try:
            return Int4Kernel(codes, scale, offset, group, act_dtype)
        except RuntimeError:
            pass  # a shape the int4 kernel does not take: the int8 form below takes any
    return Int8Kernel(codes.to(torch.int8), scale, group, offset)


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
