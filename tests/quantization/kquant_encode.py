"""A simple K-quant encoder for test files (the gguf package decodes Q2_K…Q6_K but cannot encode them).

Round to nearest with one scale (and min) per 256-value super-block: every sub-block scale field holds the same
value, so only the codes vary per value. Far from llama.cpp's quality, but valid blocks whose dequantized values
are within one step of the input. Where each code's bits go is found by probing ``gguf.quants.dequantize`` one bit
at a time, so the encoder relies on nothing but the reference decoder.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

# type: (code byte range, code bits, fp16 fields (d, dmin or None), scale bytes for sub-block scale 1 / min 0,
#        scale bytes for the encoding's scale S / min M, S, M, code offset: w = d*S*(q - offset) - dmin*M)
_SPEC = {
    T.Q2_K: ((16, 80), 2, (80, 82), (0, [0x01] * 16), [0xFF] * 16, 15, 15, 0),
    T.Q3_K: ((0, 96), 3, (108, None), (96, [0x11] * 8 + [0xAA] * 4), [0xFF] * 8 + [0xFF] * 4, 31, 0, 4),
    T.Q4_K: ((16, 144), 4, (0, 2), (4, [1] * 4 + [0] * 4 + [1] * 4), [0xFF] * 12, 63, 63, 0),
    T.Q5_K: ((16, 176), 5, (0, 2), (4, [1] * 4 + [0] * 4 + [1] * 4), [0xFF] * 12, 63, 63, 0),
    T.Q6_K: ((0, 192), 6, (208, None), (192, [1] * 16), [127] * 16, 127, 0, 32),
}


def _put_f16(block: np.ndarray, at: int, value) -> None:
    block[..., at:at + 2] = np.asarray(value, dtype=np.float16).reshape(-1, 1).view(np.uint8).reshape(
        *block.shape[:-1], 2)


@lru_cache(maxsize=None)
def _bit_layout(qtype: T) -> list[list[tuple[int, int, int]]]:
    """For each of the 256 values, the (byte, bit, code bit) positions of its code."""
    (lo, hi), bits, (d_at, dmin_at), (scale_at, unit_scales), *_ = _SPEC[qtype]
    size = GGML_QUANT_SIZES[qtype][1]
    base = np.zeros(size, dtype=np.uint8)
    base[scale_at:scale_at + len(unit_scales)] = unit_scales
    _put_f16(base, d_at, 1.0)
    probes = np.tile(base, ((hi - lo) * 8 + 1, 1))
    for i in range((hi - lo) * 8):
        probes[i + 1, lo + i // 8] |= 1 << (i % 8)
    values = quants.dequantize(probes, qtype).reshape(len(probes), 256)
    layout: list[list[tuple[int, int, int]]] = [[] for _ in range(256)]
    for i in range((hi - lo) * 8):
        delta = values[i + 1] - values[0]
        (where,) = np.nonzero(delta)
        assert len(where) == 1, (qtype, i)
        layout[where[0]].append((lo + i // 8, i % 8, int(round(np.log2(delta[where[0]])))))
    assert all(len(entry) == bits for entry in layout), qtype
    return layout


def encode(values: np.ndarray, qtype: T) -> np.ndarray:
    """Float32 ``values`` [rows, K] (K a multiple of 256) → raw blocks [rows, K / 256 * type_size]."""
    _, bits, (d_at, dmin_at), (scale_at, _), scales, s, m, offset = _SPEC[qtype]
    rows, k = values.shape
    size = GGML_QUANT_SIZES[qtype][1]
    x = values.reshape(-1, 256).astype(np.float32)
    top = (1 << bits) - 1
    if dmin_at is None:  # symmetric: w = d*S*(q - offset)
        d = np.abs(x).max(1) / (s * offset)
        d16 = np.where(d > 0, d, 1).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x / (d16 * s)[:, None]) + offset, 0, top)
        dmin16 = None
    else:  # w = d*S*q - dmin*M with the min folded into dmin
        low = np.minimum(x.min(1), 0)
        d = (x.max(1) - low) / (s * top)
        d16 = np.where(d > 0, d, 1).astype(np.float16).astype(np.float32)
        dmin16 = (-low / m).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((x + (dmin16 * m)[:, None]) / (d16 * s)[:, None]), 0, top)
    q = q.astype(np.int64)
    blocks = np.zeros((x.shape[0], size), dtype=np.uint8)
    blocks[:, scale_at:scale_at + len(scales)] = scales
    _put_f16(blocks, d_at, d16)
    if dmin_at is not None:
        _put_f16(blocks, dmin_at, dmin16)
    for element, positions in enumerate(_bit_layout(qtype)):
        for byte, bit, code_bit in positions:
            blocks[:, byte] |= (((q[:, element] >> code_bit) & 1) << bit).astype(np.uint8)
    return blocks.reshape(rows, -1)
