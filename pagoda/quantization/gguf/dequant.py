"""Dequantization of GGUF tensor types in torch.

Every function takes raw blocks ``[n_blocks, type_size]`` (uint8) and returns ``[n_blocks, block_size]``
float32, evaluating the same float32 expression in the same order as ``gguf.quants`` (llama.cpp's reference
layout), so results are bit-identical to ``gguf.quants.dequantize``. Block layouts (bytes, in order):

====== ===== ============================================================================
type   bytes layout
====== ===== ============================================================================
Q4_0   18    d:f16, qs[16] (element i: low nibble of qs[i], element 16+i: high nibble)
Q4_1   20    d:f16, m:f16, qs[16]                                 w = d*q + m
Q5_0   22    d:f16, qh:u32 (bit i = 5th bit of element i), qs[16]  w = d*(q-16)
Q5_1   24    d:f16, m:f16, qh:u32, qs[16]                          w = d*q + m
Q8_0   34    d:f16, qs:i8[32]                                      w = d*q
Q2_K   84    scales[16] (lo nibble scale, hi nibble min), qs[64] (2 bits), d:f16, dmin:f16
Q3_K   110   hmask[32], qs[64] (2 bits), scales[12] (16 × 6 bits), d:f16
Q4_K   144   d:f16, dmin:f16, scales[12] (8 scales + 8 mins, 6 bits), qs[128]
Q5_K   176   d:f16, dmin:f16, scales[12], qh[32], qs[128]
Q6_K   210   ql[128], qh[64], scales:i8[16], d:f16
====== ===== ============================================================================
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

_U8 = torch.uint8


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of every block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split ``qs`` [n, groups*L] into [n, groups, 2L]: per group, the L low nibbles then the L high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    shifts = torch.tensor([0, 4], dtype=_U8).reshape(1, 1, 2, 1)
    return ((qs >> shifts) & 0x0F).reshape(n, groups, -1)


def _bits(data: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Unpack ``width``-bit fields: ``data`` [n, groups*L] → [n, groups, (8/width)*L], shift-major."""
    n = data.shape[0]
    per_byte = 8 // width
    shifts = torch.arange(0, 8, width, dtype=_U8).reshape(1, 1, per_byte, 1)
    return ((data.reshape(n, groups, 1, -1) >> shifts) & ((1 << width) - 1)).reshape(n, groups, -1)


def _qh32(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5_0/Q5_1: the 32 high bits stored as a little-endian u32, as [n, 32] uint8 (element order)."""
    qh = blocks[:, start:start + 4]
    shifts = torch.arange(8, dtype=_U8).reshape(1, 1, 8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes → two [n, 8] uint8."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32)
    return _f16(b, 0) * (q.to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:], 1).reshape(b.shape[0], 32) | (_qh32(b, 2) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:], 1).reshape(b.shape[0], 32) | (_qh32(b, 4) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(b[:, 16:80], 2, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _nibbles(scales[:, :8], 1).reshape(n, 16)  # scales 0-7: low nibbles, 8-15: high nibbles
    high = _bits(scales[:, 8:12], 1, 2).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, 2, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 1).reshape(n, 16, 16)
    # the high bit is stored inverted: a set bit means "no offset", a clear bit subtracts 4
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, 256)


def q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K: the signed 6-bit codes (q - 32) of every block, [n, 256] int8."""
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 2).reshape(n, 2, 2, 64).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192], 2, 2).reshape(n, 8, 32)
    return ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * sc).reshape(n, 16, 1)
    return (d * q6_k_codes(b).reshape(n, 16, 16).float()).reshape(n, 256)


_BLOCK_DEQUANT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def row_bytes(ggml_type: int, row_len: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[T(ggml_type)]
    return row_len // block_size * type_size


def dequantize(raw: torch.Tensor, ggml_type: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw rows ``[rows, bytes_per_row]`` (uint8) of ``ggml_type`` → ``[rows, row_len]`` in ``dtype``."""
    ggml_type = T(ggml_type)
    rows = raw.shape[0]
    if ggml_type in _FLOAT_TYPES:
        return raw.contiguous().view(_FLOAT_TYPES[ggml_type]).reshape(rows, -1).to(dtype)
    fn = _BLOCK_DEQUANT.get(ggml_type)
    if fn is None:
        raise ValueError(f"cannot dequantize ggml type {ggml_type.name}; supported: "
                         f"{', '.join(t.name for t in (*_FLOAT_TYPES, *_BLOCK_DEQUANT))}")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)
    return fn(blocks).reshape(rows, -1).to(dtype)


def int4_affine(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K rows as 4-bit codes with one (scale, offset) per 32 values: ``w = code*scale + offset``.

    Returns ``codes`` [N, K] uint8 in 0..15, ``scale`` and ``offset`` [N, K/32] float32.
    Q4_0: w = d(q-8) → (d, -8d). Q4_1: w = dq + m → (d, m). Q4_K sub-block j: w = d·sc_j·q − dmin·m_j
    → (d·sc_j, −dmin·m_j).
    """
    ggml_type = T(ggml_type)
    n = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    b = raw.reshape(-1, type_size)
    if ggml_type in (T.Q4_0, T.Q4_1):
        off = 2 if ggml_type == T.Q4_0 else 4
        codes = _nibbles(b[:, off:], 1).reshape(n, -1)
        d = _f16(b, 0)
        offset = -8 * d if ggml_type == T.Q4_0 else _f16(b, 2)
        return codes, d.reshape(n, -1), offset.reshape(n, -1)
    if ggml_type == T.Q4_K:
        sc, mn = k_scale_min(b[:, 4:16])
        scale = _f16(b, 0) * sc.float()
        offset = -(_f16(b, 2) * mn.float())
        codes = _nibbles(b[:, 16:], 4).reshape(n, -1)
        return codes, scale.reshape(n, -1), offset.reshape(n, -1)
    raise ValueError(f"{ggml_type.name} has no 4-bit affine form")


def int8_blocks(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Q8_0 / Q6_K rows as signed int8 codes with one float32 scale per group: ``w = code * scale``.

    Returns ``codes`` [N, K] int8, ``scale`` [N, K/group] float32 and the group size (32 for Q8_0, 16 for Q6_K,
    whose scale is the product d·sc of its super-block and sub-block scales).
    """
    ggml_type = T(ggml_type)
    n = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    b = raw.reshape(-1, type_size)
    if ggml_type == T.Q8_0:
        return b[:, 2:].contiguous().view(torch.int8).reshape(n, -1), _f16(b, 0).reshape(n, -1), 32
    if ggml_type == T.Q6_K:
        scale = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
        return q6_k_codes(b).reshape(n, -1), scale.reshape(n, -1), 16
    raise ValueError(f"{ggml_type.name} has no int8 block form")


def int8_affine(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Q2_K / Q5_K / Q6_K / Q5_1 rows as int8 codes with one float32 scale and offset per sub-block:
    ``w = code * scale + offset``, the same float32 values as :func:`dequantize` (``a + (-b)`` is ``a - b``).

    Returns ``codes`` [N, K] int8, ``scale`` and ``offset`` [N, K/group] float32 (``offset`` None for Q6_K) and the
    group: Q2_K sub-block j of 16: (q, d·sc_j, −dmin·m_j); Q5_K sub-block j of 32: (q, d·sc_j, −dmin·m_j);
    Q6_K sub-block j of 16: (q − 32, d·sc_j, none); Q5_1 block of 32: (q, d, m).
    """
    ggml_type = T(ggml_type)
    n = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    b = raw.reshape(-1, type_size)
    blocks = b.shape[0]
    if ggml_type == T.Q2_K:
        scales = b[:, :16]
        scale = _f16(b, 80) * (scales & 0x0F).float()
        offset = -(_f16(b, 82) * (scales >> 4).float())
        codes = _bits(b[:, 16:80], 2, 2).reshape(blocks, 256).to(torch.int8)
        return codes.reshape(n, -1), scale.reshape(n, -1), offset.reshape(n, -1), 16
    if ggml_type == T.Q5_K:
        sc, mn = k_scale_min(b[:, 4:16])
        scale = _f16(b, 0) * sc.float()
        offset = -(_f16(b, 2) * mn.float())
        ql = _nibbles(b[:, 48:], 4).reshape(blocks, 8, 32)
        qh = _bits(b[:, 16:48], 1, 1).reshape(blocks, 8, 32)
        codes = (ql | (qh << 4)).to(torch.int8)
        return codes.reshape(n, -1), scale.reshape(n, -1), offset.reshape(n, -1), 32
    if ggml_type == T.Q6_K:
        scale = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
        return q6_k_codes(b).reshape(n, -1), scale.reshape(n, -1), None, 16
    if ggml_type == T.Q5_1:
        codes = (_nibbles(b[:, 8:], 1).reshape(blocks, 32) | (_qh32(b, 4) << 4)).to(torch.int8)
        return codes.reshape(n, -1), _f16(b, 0).reshape(n, -1), _f16(b, 2).reshape(n, -1), 32
    raise ValueError(f"{ggml_type.name} has no int8 affine form")


def int8_scaled(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K / Q5_0 rows as int8 codes with one float16 scale per 32 values, ``w = code * scale`` (Q8_0's form).

    Q5_0: (q − 16, d). Q3_K: sub-block j of 16 is ``d·sc_j·q`` with sc_j in −32..31 and q in −4..3, so the product
    ``sc_j·q`` is an integer code and ``d`` the scale; stored as ``(−sc_j·q, −d)``, the codes fit int8 (−128..124;
    ``sc_j·q`` itself reaches 128). Every product is exact in float32 (at most 20 significant bits), so the values
    equal :func:`dequantize`'s. Returns ``codes`` [N, K] int8 and ``scale`` [N, K/32] float32 (float16 values).
    """
    ggml_type = T(ggml_type)
    n = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    b = raw.reshape(-1, type_size)
    blocks = b.shape[0]
    if ggml_type == T.Q5_0:
        q = _nibbles(b[:, 6:], 1).reshape(blocks, 32) | (_qh32(b, 2) << 4)
        return (q.to(torch.int8) - 16).reshape(n, -1), _f16(b, 0).reshape(n, -1)
    if ggml_type == T.Q3_K:
        hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
        low = _nibbles(scales[:, :8], 1).reshape(blocks, 16)
        high = _bits(scales[:, 8:12], 1, 2).reshape(blocks, 16)
        sc = (low | (high << 4)).to(torch.int16) - 32
        ql = _bits(qs, 2, 2).reshape(blocks, 16, 16)
        qh = _bits(hmask, 1, 1).reshape(blocks, 16, 16)
        q = ql.to(torch.int16) - ((qh ^ 1) << 2).to(torch.int16)
        codes = (-(sc.unsqueeze(-1) * q)).to(torch.int8).reshape(blocks, 256)
        scale = (-_f16(b, 108)).expand(blocks, 8)
        return codes.reshape(n, -1), scale.reshape(n, -1)
    raise ValueError(f"{ggml_type.name} has no int8 form with float16 scales")
