"""Triton kernels for the quantized linear ops on the CUDA platform.

- ``linear_block_quant`` / ``triton``: 4-bit codes packed two per byte (8-bit codes kept as int8), float32 scales
  (and offsets) per 32 inputs. One kernel loads the packed codes, dequantizes each tile in registers and feeds
  ``tl.dot``; the dense weight never exists in memory.
- ``linear_fp8`` / ``triton``: float8_e4m3fn codes read as bytes and widened in the kernel, times the scale of
  their (row, group).
- ``linear_int8`` / ``triton`` (:mod:`pagoda.platforms.cuda_int8_ops`) and ``linear_codebook`` / ``triton``
  (:mod:`pagoda.platforms.cuda_codebook_ops`) share this module's loading and launch helpers.

Kernels are jitted on first use, not at import: the op registry imports this module on every machine, and
Triton decides at decoration time whether a kernel runs compiled or in its interpreter (``TRITON_INTERPRET=1``,
how the tests run them on the CPU). The interpreter computes half-precision arithmetic wrongly on CPU tensors,
so there every dot is done in float32 (as ``pagoda.attention_backends.triton_kernels`` does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pagoda import envs
from pagoda.ops.interface import OpImpl

# Bound by _import_triton() on first use, not at import: Triton fixes interpreted-or-compiled for its own
# library functions (tl.zeros, ...) when it is imported, so importing it here, where the op registry imports this
# module, would fix it before a test could ask for the interpreter. The kernels read these names at run time.
triton = None
tl = None
dot_tile = store_tile = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dot_tile(acc, x, w, DOT_FP32: tl.constexpr):
    """``acc + x @ w``: exact float32 products where DOT_FP32 (the logits' contract, and the interpreter; no TF32),
    else in the activations' dtype."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


def _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om):
    """A program's [BLOCK_M, BLOCK_N] tile of the output, in the output's dtype."""
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_quant_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                        stride_codes, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, GROUP: tl.constexpr,
                        DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The weight is read in two halves per tile: the first 16 inputs of every group of 32 ("lo") and the last 16
    # ("hi"). A 4-bit byte holds one of each (lo in the low nibble), so both halves come from one load with no
    # interleaving; 8-bit codes use the same split so that one kernel serves both. GROUP: inputs per scale (and
    # offset), 32, or 16 for the int8 affine form (then the two halves take their own).
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    lo_in_tile = (offs_j // 16) * 32 + offs_j % 16
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)[None, :]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    groups = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_lo = k0 + lo_in_tile
        mask_k = k_lo < K  # K is a multiple of 32, so lo and hi inputs are in range together
        x_mask = mask_m[:, None] & mask_k[None, :]
        x_lo = tl.load(x_rows + k_lo[None, :], mask=x_mask, other=0.0)
        x_hi = tl.load(x_rows + (k_lo + 16)[None, :], mask=x_mask, other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        if BITS == 4:
            packed = tl.load(codes_ptr + rows_n * stride_codes + (k0 // 2 + offs_j)[:, None], mask=w_mask, other=0)
            c_lo = (packed & 0xF).to(tl.float32)
            c_hi = (packed >> 4).to(tl.float32)
        else:
            c_lo = tl.load(codes_ptr + rows_n * stride_codes + k_lo[:, None], mask=w_mask, other=0).to(tl.float32)
            c_hi = tl.load(codes_ptr + rows_n * stride_codes + (k_lo + 16)[:, None], mask=w_mask,
                           other=0).to(tl.float32)
        group_lo = rows_n * groups + (k_lo // GROUP)[:, None]
        group_hi = group_lo if GROUP == 32 else group_lo + 1
        w_lo = c_lo * tl.load(scale_ptr + group_lo, mask=w_mask, other=0.0)
        w_hi = c_hi * tl.load(scale_ptr + group_hi, mask=w_mask, other=0.0)
        if HAS_OFFSET:
            w_lo += tl.load(offset_ptr + group_lo, mask=w_mask, other=0.0)
            w_hi += tl.load(offset_ptr + group_hi, mask=w_mask, other=0.0)
        acc = dot_tile(acc, x_lo, w_lo, DOT_FP32)
        acc = dot_tile(acc, x_hi, w_hi, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om)


def _fp8_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, groups, stride_xm, stride_om, GROUP: tl.constexpr,
                DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)[None, :]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        byte = tl.load(w_ptr + rows_n * K + offs_k[:, None], mask=w_mask, other=0).to(tl.int16)
        # e4m3 → float16 by moving the exponent and mantissa bits into place: the float16 value is 2^-8 of the
        # e4m3 one, subnormals included (no hardware FP8 conversion, so this also runs on sm_80). 0x7F/0xFF
        # (NaN in e4m3fn) decode to ±480; checkpoints hold no NaN.
        magnitude = ((byte & 0x7F) << 7).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        w = tl.where((byte & 0x80) != 0, -magnitude, magnitude)
        w = w * tl.load(scale_ptr + rows_n * groups + (offs_k // GROUP)[:, None], mask=w_mask, other=0.0)
        acc = dot_tile(acc, x, w, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om)


@functools.cache
def _import_triton() -> str | None:
    """Import triton into this module's globals; ``None``, or why it can't be imported."""
    global triton, tl, dot_tile, store_tile
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # triton is an optional dependency (pagoda-llm[cuda])
        return f"triton failed to import ({exc})"
    # The kernels' shared steps, jitted like them (every kernel module binds these names for its kernels)
    dot_tile, store_tile = triton.jit(_dot_tile), triton.jit(_store_tile)
    return None


@functools.cache
def kernels() -> SimpleNamespace:
    """The jitted kernels (compiled, or interpreted under ``TRITON_INTERPRET=1`` at the first call)."""
    problem = _import_triton()
    if problem is not None:
        raise RuntimeError(problem)
    return SimpleNamespace(block_quant=triton.jit(_block_quant_kernel), fp8=triton.jit(_fp8_kernel))


def _tiles(m: int) -> tuple[int, int, int]:
    # tl.dot needs at least 16 rows; decode batches pad up to that. Untuned: chosen for sm_80/sm_90 register
    # budgets at 4 warps, not measured on a GPU.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _dot_fp32(x: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return out_dtype == torch.float32 or x.dtype == torch.float32 or envs.triton_interpret()


class _TritonLinear(OpImpl):
    platforms = ("cuda",)
    requires = ("package:triton",)
    dtypes = _DTYPES
    priority = 10
    name = "triton"

    @classmethod
    def check(cls, platform) -> str | None:
        problem = _import_triton()
        if problem is not None:
            return problem
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major < 8:
                return (f"needs compute capability 8.0+ (Ampere or newer) for bf16 and int8 tensor-core dots; "
                        f"this GPU is {major}.{minor}")
        return None

    def _matmul(self, handle, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, handle, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x, x.dtype)

    def logits(self, handle, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x, torch.float32)

    def greedy(self, handle, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return None


@dataclass
class TritonBlockQuantWeight:
    codes: torch.Tensor  # 4-bit: uint8 [n, k / 2] (see pack_4bit); 8-bit: int8 [n, k]
    scale: torch.Tensor  # float32 [n, k / group]
    offset: torch.Tensor | None  # float32 [n, k / group]: 4-bit codes, and int8 codes from prepare_affine
    bits: int
    n: int
    k: int
    group: int = 32  # 16 or 32 (prepare_affine's int8 codes), else 32


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [n, k] → [n, k / 2]: within each group of 32, input j in the low nibble of byte j and
    input 16 + j in its high nibble."""
    n, k = codes.shape
    halves = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_4bit`."""
    n = packed.shape[0]
    bytes_ = packed.reshape(n, -1, 16)
    return torch.cat([bytes_ & 0xF, bytes_ >> 4], dim=-1).reshape(n, -1)


class TritonBlockQuant(_TritonLinear):
    op = "linear_block_quant"

    def accepts(self, in_features: int, act_dtype: torch.dtype) -> bool:
        return in_features % 32 == 0 and act_dtype in _DTYPES

    def prepare(self, codes, scale, offset, bits) -> TritonBlockQuantWeight:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 8 and offset is not None:
            raise ValueError("8-bit codes take no offset")
        n, k = codes.shape
        if bits == 4:
            packed = pack_4bit(codes)
            scale = scale.float()
        else:
            packed = codes.to(torch.int8).contiguous()
            scale = scale.to(torch.float16).float()  # the op's 8-bit scales are float16 values
        offset = None if offset is None else offset.float().contiguous()
        return TritonBlockQuantWeight(packed, scale.contiguous(), offset, bits, n, k)

    def accepts_affine(self, in_features: int, group: int, act_dtype: torch.dtype) -> bool:
        return group in (16, 32) and in_features % 32 == 0 and act_dtype in _DTYPES

    def prepare_affine(self, codes, scale, offset, group) -> TritonBlockQuantWeight:
        # GGUF's K-quant sub-blocks (Q2_K, Q5_K, Q6_K …): int8 codes, float32 scale and offset per 16 or 32 inputs.
        if codes.dtype != torch.int8 or group not in (16, 32):
            raise ValueError(f"affine weights need int8 codes in groups of 16 or 32, got {codes.dtype}, {group}")
        n, k = codes.shape
        offset = None if offset is None else offset.float().contiguous()
        return TritonBlockQuantWeight(codes.contiguous(), scale.float().contiguous(), offset, 8, n, k, group)

    def _matmul(self, handle: TritonBlockQuantWeight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = _as_rows(x, handle.k)
        m = x2.shape[0]
        out = torch.empty(m, handle.n, dtype=out_dtype, device=x.device)
        if m:
            bm, bn, bk = _tiles(m)
            offset = handle.offset if handle.offset is not None else handle.scale  # never read without HAS_OFFSET
            kernels().block_quant[(_cdiv(m, bm), _cdiv(handle.n, bn))](
                x2, handle.codes, handle.scale, offset, out, m, handle.n, handle.k, x2.stride(0), out.stride(0),
                handle.codes.stride(0), BITS=handle.bits, HAS_OFFSET=handle.offset is not None, GROUP=handle.group,
                DOT_FP32=_dot_fp32(x2, out_dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return out.reshape(*x.shape[:-1], handle.n)

    def rows(self, handle: TritonBlockQuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # An embedding gather: a few rows, so torch does it without a kernel of its own.
        flat = ids.reshape(-1)
        codes = handle.codes[flat]
        codes = unpack_4bit(codes) if handle.bits == 4 else codes
        w = codes.float().unflatten(-1, (-1, handle.group)) * handle.scale[flat].unsqueeze(-1)
        if handle.offset is not None:
            w = w + handle.offset[flat].unsqueeze(-1)
        return w.flatten(-2).reshape(*ids.shape, -1).to(dtype)

    def nbytes(self, handle):
        return sum(t.numel() * t.element_size() for t in (handle.codes, handle.scale, handle.offset)
                   if t is not None)


@dataclass
class TritonFp8Weight:
    codes: torch.Tensor  # uint8 [n, k]: the float8_e4m3fn bits
    scale: torch.Tensor  # float32 [n, k / group]
    group: int


class TritonFp8(_TritonLinear):
    op = "linear_fp8"

    def accepts(self, in_features: int, group: int, act_dtype: torch.dtype) -> bool:
        return in_features % group == 0 and act_dtype in _DTYPES

    def prepare(self, weight, scale, group) -> TritonFp8Weight:
        n, k = weight.shape
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 weights must be float8_e4m3fn, got {weight.dtype}")
        if k % group or scale.shape != (n, k // group):
            raise ValueError(f"FP8 scales for a [{n}, {k}] weight in groups of {group} must be {(n, k // group)}, "
                             f"got {tuple(scale.shape)}")
        return TritonFp8Weight(weight.contiguous().view(torch.uint8), scale.float().contiguous(), group)

    def _matmul(self, handle: TritonFp8Weight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        n, k = handle.codes.shape
        x2 = _as_rows(x, k)
        m = x2.shape[0]
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
        if m:
            bm, bn, bk = _tiles(m)
            kernels().fp8[(_cdiv(m, bm), _cdiv(n, bn))](
                x2, handle.codes, handle.scale, out, m, n, k, k // handle.group, x2.stride(0), out.stride(0),
                GROUP=handle.group, DOT_FP32=_dot_fp32(x2, out_dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return out.reshape(*x.shape[:-1], n)

    def nbytes(self, handle):
        return handle.codes.numel() + handle.scale.numel() * 4


CUDA_QUANT_OP_IMPLS = [TritonBlockQuant, TritonFp8]
