"""Tensor-level entry points to the native CPU kernels for the quantized checkpoint formats: FP8 codes, 4-bit
codes with zero points and int8 codes with a scale and offset per 16 or 32 (all multiplied by
``pagoda_quant_gemm``, in :class:`cpu_ops.PackedQuant` buffers), AQLM codebooks and AMX-INT8 W8A8 weights."""

from __future__ import annotations

import ctypes
import itertools
from ctypes import c_int64, c_void_p

import torch

from pagoda.platforms.cpu.kernels.cpu import kernels
from pagoda.platforms.cpu.kernels.cpu_ops import (AFFINE_KIND, PackedQuant, _bf16_rows, _check, _threads, pad_to_tiles,
                                                  tile_params)

E4M3 = 9  # the ``bits`` of FP8 e4m3 codes (pagoda_quant_gemm's kE4M3)
E4M3_CHANNEL = 10  # the same layout, one scale per output row (kE4M3Channel)
E4M3_GROUP = 64  # inputs per FP8 scale in the packed form


def pack_fp8(weight: torch.Tensor, scale: torch.Tensor) -> PackedQuant:
    """Pack float8_e4m3fn ``weight`` [n, k] with float32 ``scale`` [n, k / 64] (``k`` a multiple of 64): per pair of
    inputs, each of the tile's 16 columns' two bytes side by side (the order vdpbf16ps takes them), in groups of 64.
    Where every row has one scale (per-channel and per-tensor checkpoints) the kind says so, and the kernels sum a
    row's products over all of ``k`` before scaling them once."""
    n, k = weight.shape
    groups = k // E4M3_GROUP
    kind = E4M3_CHANNEL if bool((scale == scale[:, :1]).all()) else E4M3
    tiles, (codes, scale) = pad_to_tiles(n, weight.view(torch.uint8), scale)
    c = codes.reshape(tiles, 16, groups, E4M3_GROUP // 2, 2).permute(0, 2, 3, 1, 4)  # [tile, group, pair, col, elem]
    code_bytes = c.reshape(tiles, groups, E4M3_GROUP * 16)
    params = tile_params(scale, torch.float32, tiles, groups)
    return PackedQuant(torch.cat([code_bytes, params], dim=-1).contiguous(), n, k, kind)


ZERO_KIND = 100  # kind ZERO_KIND + group: 4-bit codes with a float16 scale and zero per group (pagoda_quant_gemm)
ZERO8_KIND = 400  # kind ZERO8_KIND + group: int8 codes with a float16 scale and zero per group (above the affine kinds)
ZERO_GROUPS = (32, 64, 128)


def pack_zero_point(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                    bits: int = 4) -> PackedQuant:
    """Pack ``codes`` [n, k] (4 bits: uint8 0..15; 8 bits: int8) with float16-exact ``scale`` and ``zero``
    [n, k / group] (``group`` one of ``ZERO_GROUPS``): ``w = (code - zero) * scale``, the form AWQ / GPTQ checkpoints
    store, at their own group size. 4-bit codes two to a byte; int8 codes as the 8-bit kind lays them out."""
    n, k = codes.shape
    groups = k // group
    tiles, (codes, scale, zero) = pad_to_tiles(n, codes, scale, zero)
    if bits == 4:
        c = codes.to(torch.uint8).reshape(tiles, 16, groups, group // 2, 2).permute(0, 2, 3, 1, 4)
        code_bytes, kind = (c[..., 0] | (c[..., 1] << 4)).reshape(tiles, groups, group * 8), ZERO_KIND
    else:
        code_bytes, kind = _int8_code_bytes(codes, tiles, groups, group), ZERO8_KIND
    data = torch.cat([code_bytes, tile_params(scale, torch.float16, tiles, groups),
                      tile_params(zero, torch.float16, tiles, groups)], dim=-1).contiguous()
    return PackedQuant(data, n, k, kind + group)


def _int8_code_bytes(codes: torch.Tensor, tiles: int, groups: int, group: int) -> torch.Tensor:
    """int8 ``codes`` [tiles * 16, k] as the 8-bit kinds lay them out: per tile, group and pair of inputs, the tile's
    16 columns' first input, then their second ([tiles, groups, group * 16] bytes)."""
    c = codes.to(torch.int8).reshape(tiles, 16, groups, group // 2, 2).permute(0, 2, 3, 4, 1)
    return c.reshape(tiles, groups, group * 16).view(torch.uint8)


def pack_affine_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> PackedQuant:
    """Pack int8 ``codes`` [n, k] with float32 ``scale`` and ``offset`` [n, k / group] (``group`` 16 or 32):
    ``w = code * scale + offset`` (GGUF's K-quant sub-blocks). Codes as the 8-bit kind lays them out (per pair of
    inputs, the tile's 16 columns' first input, then their second), then the 16 scales and the 16 offsets."""
    n, k = codes.shape
    groups = k // group
    tiles, (codes, scale, offset) = pad_to_tiles(n, codes, scale, offset)
    data = torch.cat([_int8_code_bytes(codes, tiles, groups, group), tile_params(scale, torch.float32, tiles, groups),
                      tile_params(offset, torch.float32, tiles, groups)], dim=-1).contiguous()
    return PackedQuant(data, n, k, AFFINE_KIND + group)


CODEBOOK_MAX_ROWS = 16  # float32 logits up to here build each 8-weight tile in a register (exact); above: the reference
CODEBOOK_TABLE_ENTRIES = 256  # books of up to this many entries keep 8-bit codes (and one-row batches a table)
CODE_BLOCK = 4  # input groups per block of 8-bit codes' layout (cpu_codebook_weight.h's kCodeBlock)


class _CodebookWeight(ctypes.Structure):  # cpu_codebook_weight.h's CodebookWeight
    _fields_ = [("codes", c_void_p), ("books", c_void_p), ("books_t", c_void_p), ("scales", c_void_p),
                ("shard_rows", c_void_p)] + [
        (name, c_int64) for name in ("shards", "num_books", "book_size", "book_stride", "n", "k")]


class PackedCodebook:
    """AQLM weights with one output and 8 inputs per code, as the native kernels read them: a merged layer's shards
    side by side, each with its own books. Books of up to 256 entries keep uint8 codes (the checkpoint's own size),
    blocked by ``CODE_BLOCK`` input groups ([blocks][n][block's groups][books]) so that the one-row table kernel's
    pass over every output reads a block in order, and their entries by input, float32 ``books_t`` [shards, books,
    8, size padded to 16], from which that kernel tabulates dot products. Larger books keep int16 codes (unsigned
    values) tiled by 16 outputs ([tiles][groups][16][books], the last tile padded with code 0), so that the kernels
    that build a column tile read its codes as one stream, and float16 ``books`` [shards, books, size, 8].
    ``weight`` is the descriptor both the op and the fused decode step pass."""

    def __init__(self, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor, shard_sizes: list[int]):
        n, groups, num_books = codes.shape
        shards, _, size, _ = books.shape
        small = size <= CODEBOOK_TABLE_ENTRIES
        if small:
            codes = codes.to(torch.uint8)
        else:
            wide = codes.to(torch.int32)
            codes = torch.where(wide >= 1 << 15, wide - (1 << 16), wide).to(torch.int16)  # uint16 bits in int16
        if small:
            self.codes = torch.cat([codes[:, i:i + CODE_BLOCK].reshape(-1)
                                    for i in range(0, groups, CODE_BLOCK)]).contiguous()
        else:
            tiles = -(-n // 16)
            padded = torch.zeros(tiles * 16, groups, num_books, dtype=codes.dtype)
            padded[:n] = codes
            self.codes = padded.reshape(tiles, 16, groups, num_books).transpose(1, 2).contiguous().reshape(-1)
        books = books.to(torch.float16)
        self.books = self.books_t = None
        stride = -(-size // 16) * 16
        if small:
            self.books_t = torch.zeros(shards, num_books, 8, stride, dtype=torch.float32)
            self.books_t[..., :size] = books.transpose(2, 3).float()
        else:
            self.books = books.contiguous()
        self.scales = scales.float().reshape(-1).contiguous()
        self.shard_rows = torch.tensor([0, *itertools.accumulate(shard_sizes)], dtype=torch.int64)
        self.n, self.k, self.num_books, self.book_size = n, groups * 8, num_books, size
        pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.weight = _CodebookWeight(self.codes.data_ptr(), pointer(self.books), pointer(self.books_t),
                                      self.scales.data_ptr(), self.shard_rows.data_ptr(), shards, num_books, size,
                                      stride, n, self.k)

    def unblocked_codes(self) -> torch.Tensor:
        """The codes as int64 [n, k / 8, books], unsigned."""
        n, groups, num_books = self.n, self.k // 8, self.num_books
        if self.books is not None:  # 16-bit codes, tiled by 16 outputs
            tiled = self.codes.reshape(-1, groups, 16, num_books).transpose(1, 2).reshape(-1, groups, num_books)
            return tiled[:n].long() & 0xFFFF
        parts, offset = [], 0
        for i in range(0, groups, CODE_BLOCK):
            width = min(CODE_BLOCK, groups - i)
            parts.append(self.codes[offset:offset + n * width * num_books].reshape(n, width, num_books))
            offset += n * width * num_books
        return torch.cat(parts, dim=1).long() & 0xFFFF

    def books_by_entry(self) -> torch.Tensor:
        """The books as float32 [shards, books, size, 8]."""
        if self.books is not None:
            return self.books.float()
        return self.books_t[..., :self.book_size].transpose(2, 3)

    def nbytes(self) -> int:
        tensors = (self.codes, self.books, self.books_t, self.scales, self.shard_rows)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def codebook_linear(x: torch.Tensor, weight: PackedCodebook, float_output: bool = False,
                    amx: bool = False) -> torch.Tensor:
    """``x @ W.T`` for bf16 ``x`` [m, k] and a :class:`PackedCodebook` weight. One or two rows (the table for books
    of up to 256 entries, tiles built in registers for larger ones) and float32 outputs of up to
    ``CODEBOOK_MAX_ROWS`` rows multiply the exact float32 weights; other batches multiply them as bf16 (each rounded
    once, as the dequantized matrix cast to bf16 would be), 16 outputs at a time; ``amx``: on AMX tiles (where the
    process may use them)."""
    x2 = _bf16_rows(x, weight.k, "codebook_linear")
    out = torch.empty(x2.shape[0], weight.n, dtype=torch.float32 if float_output else torch.bfloat16)
    if x2.shape[0]:
        _check(kernels().codebook_gemm(int(float_output), out.data_ptr(), x2.data_ptr(), ctypes.byref(weight.weight),
                                       x2.shape[0], _threads(), int(amx)), "pagoda_codebook_gemm")
    return out


class PackedInt8:
    """An int8 weight [n, k] with its inputs zero-padded to a multiple of 64, as AMX-INT8 B tiles, [tile of 16
    rows][k / 4][16][4] (one k-quad of a tile is also the vector AVX512-VNNI multiplies), followed by its float32 scale
    per row and the int32 sum of each row's codes (the VNNI path's correction for its offset activations), both padded
    to whole tiles: one buffer, as the fused decode step reads it."""

    __slots__ = ("data", "n", "k", "ptr")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        n, k = weight.shape
        tiles, (weight, scale) = pad_to_tiles(n, weight, scale)
        kp = -(-k // 64) * 64
        weight = torch.nn.functional.pad(weight, (0, kp - k))
        tiles_bytes = weight.reshape(tiles, 16, kp // 4, 4).permute(0, 2, 1, 3).contiguous().view(torch.uint8)
        sums = weight.to(torch.int32).sum(1, dtype=torch.int32)
        self.data = torch.cat([tiles_bytes.reshape(-1), scale.float().contiguous().view(torch.uint8),
                               sums.contiguous().view(torch.uint8)])
        self.n, self.k = n, k
        self.ptr = self.data.data_ptr()


def int8_linear(x: torch.Tensor, weight: PackedInt8, input_scale: float | None = None,
                float_output: bool = False, amx: bool = False) -> torch.Tensor:
    """``x @ W.T`` for bf16 ``x`` [..., k]: rows quantized to int8 (per row, or with ``input_scale``), multiplied by
    the packed int8 ``W`` (on AMX-INT8 tiles with ``amx``, else AVX512-VNNI) and scaled by each row's and column's
    scale."""
    x2 = _bf16_rows(x, weight.k, "int8_linear")
    out = torch.empty(x2.shape[0], weight.n, dtype=torch.float32 if float_output else torch.bfloat16)
    if x2.shape[0]:
        _check(kernels().int8_gemm(int(float_output), out.data_ptr(), x2.data_ptr(), weight.ptr, None, x2.shape[0],
                                   weight.n, weight.k, float(input_scale or 0.0), int(amx), _threads()),
               "pagoda_int8_gemm")
    return out if x.dim() == 2 else out.unflatten(0, x.shape[:-1])
