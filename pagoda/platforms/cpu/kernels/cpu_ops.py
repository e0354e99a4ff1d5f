"""Tensor-level entry points to the native CPU kernels (see :mod:`pagoda.platforms.cpu.kernels.cpu`).

The CPU platform's op implementations (:mod:`pagoda.platforms.cpu.ops`) call these; each entry point checks
the layouts it addresses (``None`` or ``False`` where it doesn't apply).
"""

from __future__ import annotations

import torch

from pagoda.platforms.cpu.kernels.cpu import DTYPE_CODES, kernels


def _threads() -> int:
    return torch.get_num_threads()


def _paged_cache_rows(key_cache: torch.Tensor, value_cache: torch.Tensor, head_size: int) -> bool:
    """Whether the paged caches [blocks, block_size, kv_heads, d] keep each token's heads in one contiguous row,
    with the same strides for keys and values: the layout the native attention kernels address."""
    return (key_cache.stride(2) == head_size and key_cache.stride(3) == 1
            and value_cache.stride() == key_cache.stride())


def _table_ok(block_table: torch.Tensor) -> bool:
    """An int32 block table whose rows may be strided but hold their entries contiguously."""
    return block_table.dtype == torch.int32 and block_table.stride(1) == 1


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     sliding_window: int | None, soft_cap: float | None = None) -> torch.Tensor | None:
    """Paged decode attention reading the cache in place (``soft_cap``: logits become ``cap * tanh(s / cap)``).

    ``query`` [n, heads, d]; ``key_cache``/``value_cache`` [blocks, block_size, kv_heads, d] (token rows
    contiguous); ``block_table`` int32 [n, max_blocks] (rows may be strided); ``seq_lens`` int32 [n].
    Returns ``[n, heads, d]`` in the query's dtype, or None when the kernel does not apply.
    """
    lib = kernels()
    code = DTYPE_CODES.get(query.dtype)
    if lib is None or code is None or query.device.type != "cpu" or key_cache.dtype != query.dtype:
        return None
    n, heads, d = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    if not (_paged_cache_rows(key_cache, value_cache, d) and _table_ok(block_table) and seq_lens.dtype == torch.int32):
        return None
    query = query.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty_like(query)
    rc = lib.decode_attention(code, out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                              block_table.data_ptr(), block_table.stride(0), seq_lens.data_ptr(), n, heads,
                              kv_heads, d, block_size, key_cache.stride(0), key_cache.stride(1), scale,
                              sliding_window or 0, soft_cap or 0.0, _threads())
    _check(rc, "pagoda_decode_attention")
    return out


def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      sliding_window: int | None, soft_cap: float | None = None) -> torch.Tensor | None:
    """Causal attention of prefill chunks whose keys and values are already in the paged cache (bf16).

    ``query`` [tokens, heads, d] (token rows may be strided); sequence ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i + 1]``, the last positions of its ``seq_lens[i]`` cached tokens, and
    reads its context through ``block_table[i]``. Returns ``[tokens, heads, d]``, or None when the kernel does
    not apply (another dtype, head size or layout, or no AVX512-BF16).
    """
    lib = kernels()
    if (lib is None or query.dtype != torch.bfloat16 or key_cache.dtype != torch.bfloat16
            or query.device.type != "cpu"):
        return None
    tokens, heads, d = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    if (query.stride(2) != 1 or query.stride(1) != d or not _paged_cache_rows(key_cache, value_cache, d)
            or not _table_ok(block_table) or query_start_loc.dtype != torch.int32 or seq_lens.dtype != torch.int32):
        return None
    query_start_loc = query_start_loc.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(tokens, heads, d, dtype=query.dtype)
    rc = lib.prefill_attention(out.data_ptr(), query.data_ptr(), query.stride(0), key_cache.data_ptr(),
                               value_cache.data_ptr(), block_table.data_ptr(), block_table.stride(0),
                               query_start_loc.data_ptr(), seq_lens.data_ptr(), seq_lens.shape[0], heads, kv_heads, d,
                               block_size, key_cache.stride(0), key_cache.stride(1), scale, sliding_window or 0,
                               soft_cap or 0.0, _threads())
    return out if rc == 0 else None


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """Store ``key``/``value`` [tokens, kv_heads, d] in the paged caches [blocks, block_size, kv_heads, d] at
    ``slot_mapping`` (int64): ``index_copy_``'s result without its per-element indexing. False when the layouts
    don't allow it (the caller copies with torch)."""
    lib = kernels()
    if (lib is None or key.device.type != "cpu" or key.dtype != key_cache.dtype or value.dtype != key.dtype
            or slot_mapping.dtype != torch.int64):
        return False
    tokens, kv_heads, d = key.shape
    row = kv_heads * d
    for t in (key, value):
        if t.stride(2) != 1 or t.stride(1) != d:
            return False
    if not _paged_cache_rows(key_cache, value_cache, d):
        return False
    slot_mapping = slot_mapping.contiguous()
    esz = key.element_size()
    lib.write_kv(key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), key.stride(0) * esz,
                 value.data_ptr(), value.stride(0) * esz, slot_mapping.data_ptr(), tokens, row * esz,
                 key_cache.shape[1], key_cache.stride(0) * esz, key_cache.stride(1) * esz, _threads())
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` [rows, hidden]; with ``residual``, of ``x + residual``, returning ``(out, x + residual)``;
    ``unit_offset``: scaled by ``1 + weight`` in float32 (Gemma)."""
    lib = kernels()
    x = x.contiguous()
    out = torch.empty_like(x)
    residual_out = None
    if residual is not None:
        residual = residual.contiguous()
        residual_out = torch.empty_like(x)
    rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    lib.rms_norm(DTYPE_CODES[x.dtype], out.data_ptr(), residual_out.data_ptr() if residual_out is not None else None,
                 x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(), rows, hidden,
                 eps, int(unit_offset), _threads())
    return out if residual_out is None else (out, residual_out)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``x`` [rows, hidden] (``weight``/``bias`` optional); with ``residual``, of ``x + residual``,
    returning ``(out, x + residual)``."""
    lib = kernels()
    x = x.contiguous()
    out = torch.empty_like(x)
    residual_out = None
    if residual is not None:
        residual = residual.contiguous()
        residual_out = torch.empty_like(x)

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    _check(lib.layer_norm(DTYPE_CODES[x.dtype], out.data_ptr(), ptr(residual_out), x.data_ptr(), ptr(residual),
                          ptr(weight), ptr(bias), rows, hidden, eps, _threads()), "pagoda_layer_norm")
    return out if residual_out is None else (out, residual_out)


#: The ``activation`` op's names the native kernel computes, with its code for each.
NATIVE_ACTIVATIONS = {"relu": 0, "gelu_tanh": 1}


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` (a key of :data:`NATIVE_ACTIVATIONS`) applied to each element of ``x``."""
    lib = kernels()
    x = x.contiguous()
    out = torch.empty_like(x)
    _check(lib.activation(DTYPE_CODES[x.dtype], out.data_ptr(), x.data_ptr(), x.numel(), NATIVE_ACTIVATIONS[name],
                          _threads()), "pagoda_activation")
    return out


#: The gated activations the library computes (its GatedActivation codes).
GATED_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def gated_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``act(x[..., :d]) * x[..., d:]`` for ``x`` [..., 2d], ``name`` a key of :data:`GATED_ACTIVATIONS`
    (gelu_tanh: the activation rounded to ``x``'s dtype before the multiply, as torch computes it)."""
    lib = kernels()
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype)
    _check(lib.gated_activation(DTYPE_CODES[x.dtype], out.data_ptr(), x.data_ptr(), x.numel() // x.shape[-1], inter,
                                GATED_ACTIVATIONS[name], _threads()), "pagoda_gated_activation")
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x`` [tokens, heads, head_size] in place (heads contiguous, rows may be
    strided, as views of a fused QKV output are); ``cos``/``sin`` float32 [tokens, rotary_dim] with rotate-half's
    sign in ``sin``."""
    lib = kernels()
    tokens, heads, head_size = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_size:
        raise ValueError(f"rotary_ needs contiguous heads, got strides {x.stride()}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"rotary_ takes float32 cos/sin rows, got {cos.dtype}/{sin.dtype}")
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.rope(DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), tokens, heads, head_size, cos.data_ptr(),
             sin.data_ptr(), cos.shape[-1], _threads())
    return x


class PackedWeight:
    """A bf16 weight ``[n, k]`` repacked for :func:`packed_linear`, with its bias in float32.

    Layout: tiles of 16 output rows; inside a tile, pairs of consecutive ``k`` interleaved per row
    (``[n / 16][k / 2][16][2]``, zero-padded), the order AVX512-BF16's pairwise dot product reads.
    """

    __slots__ = ("data", "n", "k", "bias", "ptrs", "screen")

    def __init__(self, data: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> None:
        self.data, self.n, self.k, self.bias = data, n, k, bias
        self.screen = None  # an LM head's int8 screen for its greedy argmax (cpu_head.HeadScreen), where it has one
        # Looked up once: a decode step makes ~120 of these calls, each on the critical path.
        self.ptrs = (data.data_ptr(), bias.data_ptr() if bias is not None else None)

    def _tiles(self) -> torch.Tensor:
        return self.data.view(-1, -(-self.k // 2), 16, 2)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the original weight (an embedding lookup on a tied LM head)."""
        flat = _row_indices(index, self.n)
        out = torch.empty(flat.numel(), self.k, dtype=torch.bfloat16)
        kernels().packed_rows(out.data_ptr(), self.ptrs[0], flat.data_ptr(), flat.numel(), self.k, _threads())
        return out.reshape(*index.shape, self.k)

    def unpack(self) -> torch.Tensor:
        """The original ``[n, k]`` weight."""
        return self._tiles().permute(0, 2, 1, 3).reshape(-1, self._tiles().shape[1] * 2)[: self.n, : self.k]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (self.screen.nbytes() if self.screen else 0)


def _row_indices(index: torch.Tensor, n: int) -> torch.Tensor:
    """``index`` flattened to contiguous int64 for a native row gather, every entry checked to be a row of ``n``
    (the kernels index without bounds checks)."""
    flat = index.reshape(-1).to(torch.int64).contiguous()
    if flat.numel():
        low, high = torch.aminmax(flat)
        if int(low) < 0 or int(high) >= n:
            raise IndexError(f"row index out of range for a weight of {n} rows")
    return flat


def packed_elems(n: int, k: int) -> int:
    """Elements of an [n, k] matrix packed by ``pagoda_pack_bf16`` (tiles of 16 rows, k in pairs, zero-padded)."""
    return -(-n // 16) * 16 * (-(-k // 2)) * 2


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
    """Repack a bf16 ``[n, k]`` weight (the library must have the packed GEMM: ``kernels().has_packed_bf16``)."""
    lib = kernels()
    n, k = weight.shape
    data = torch.empty(packed_elems(n, k), dtype=torch.bfloat16)
    weight = weight.contiguous()
    lib.pack_bf16(data.data_ptr(), weight.data_ptr(), n, k)
    return PackedWeight(data, n, k, bias.float().contiguous() if bias is not None else None)


def _bf16_rows(x: torch.Tensor, k: int, op: str) -> torch.Tensor:
    """``x [..., k]`` as contiguous bf16 rows ``[rows, k]`` for the matmul kernels, which read bf16 only."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"{op} takes bfloat16 inputs, got {x.dtype}")
    return x.reshape(-1, k).contiguous()


def _check(rc: int, kernel: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{kernel} failed with code {rc}")


def packed_linear(x: torch.Tensor, weight: PackedWeight, float_output: bool = False,
                  amx: bool = False) -> torch.Tensor:
    """``x @ W.T + b`` for bf16 ``x [..., k]`` against a packed weight; float32 out when ``float_output``. With
    ``amx`` (only where the process may use AMX tiles), batches of 8 rows and more run on AMX tiles."""
    x2 = _bf16_rows(x, weight.k, "packed_linear")
    rows = x2.shape[0]
    out = torch.empty(rows, weight.n, dtype=torch.float32 if float_output else torch.bfloat16)
    if rows:
        _check(kernels().gemm_packed(int(float_output), out.data_ptr(), weight.n, x2.data_ptr(), weight.ptrs[0],
                                     weight.ptrs[1], rows, weight.n, weight.k, _threads(), int(amx)),
               "pagoda_gemm_packed")
    return out if x.dim() == 2 else out.unflatten(0, x.shape[:-1])


class PackedQuant:
    """A block-quantized weight ``w = code * scale + offset`` (one scale and offset per 32 consecutive inputs)
    packed for :func:`quant_linear`: per tile of 16 outputs and group of 32 inputs, the codes, then the scales —
    4-bit pairs in a byte with float32 scales and offsets, or int8 codes with float16 scales and no offset."""

    __slots__ = ("data", "n", "k", "bits", "ptr")

    def __init__(self, data: torch.Tensor, n: int, k: int, bits: int) -> None:
        self.data, self.n, self.k, self.bits = data, n, k, bits
        self.ptr = data.data_ptr()

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` of the weight, dequantized to ``dtype`` (embedding lookups)."""
        if self.bits not in (4, 8) and self.bits not in AFFINE_KINDS:
            raise ValueError(f"rows of packed kind {self.bits} are not supported (only tables of 4/8-bit blocks "
                             "and int8 affine groups)")
        flat = _row_indices(index, self.n)
        if flat.numel() and dtype in (torch.bfloat16, torch.float32):  # one native gather, no per-step torch graph
            out = torch.empty(flat.numel(), self.k, dtype=dtype)
            if kernels().quant_rows(self.bits, int(dtype == torch.float32), out.data_ptr(), self.ptr,
                                    flat.data_ptr(), flat.numel(), self.k, _threads()) == 0:
                return out.reshape(*index.shape, self.k)
        blocks = self.data[flat // 16]  # [T, G, block bytes]
        col = (flat % 16)[:, None, None]
        if self.bits in AFFINE_KINDS:
            return self._affine_rows(blocks, col, self.bits - AFFINE_KIND).reshape(*index.shape, self.k).to(dtype)
        groups = self.k // 32
        code_bytes = 256 if self.bits == 4 else 512
        if self.bits == 4:
            packed = blocks[..., :code_bytes].reshape(-1, groups, 16, 16)  # [T, G, pair, col]
            byte = packed.gather(3, col.unsqueeze(-1).expand(-1, groups, 16, 1)).squeeze(-1)
            codes = torch.stack([byte & 0xF, byte >> 4], dim=-1).reshape(-1, groups, 32).float()
        else:
            packed = blocks[..., :code_bytes].reshape(-1, groups, 32, 16).view(torch.int8)  # [T, G, k, col]
            codes = packed.gather(3, col.unsqueeze(-1).expand(-1, groups, 32, 1)).squeeze(-1).float()
        if self.bits == 4:
            params = blocks[..., code_bytes:].contiguous().view(torch.float32).reshape(-1, groups, 2, 16)
            scale = params[:, :, 0].gather(2, col.expand(-1, groups, 1))
            w = codes * scale + params[:, :, 1].gather(2, col.expand(-1, groups, 1))
        else:
            params = blocks[..., code_bytes:].contiguous().view(torch.float16).reshape(-1, groups, 16).float()
            w = codes * params.gather(2, col.expand(-1, groups, 1))
        return w.reshape(*index.shape, self.k).to(dtype)


    def _affine_rows(self, blocks: torch.Tensor, col: torch.Tensor, group: int) -> torch.Tensor:
        """Rows of an int8 affine weight (kind ``AFFINE_KIND + group``): ``code * scale + offset`` in float32."""
        groups, code_bytes = self.k // group, group * 16
        packed = blocks[..., :code_bytes].reshape(-1, groups, group, 16).view(torch.int8)  # [T, G, k, col]
        codes = packed.gather(3, col.unsqueeze(-1).expand(-1, groups, group, 1)).squeeze(-1).float()
        params = blocks[..., code_bytes:].contiguous().view(torch.float32).reshape(-1, groups, 2, 16)
        scale = params[:, :, 0].gather(2, col.expand(-1, groups, 1))
        offset = params[:, :, 1].gather(2, col.expand(-1, groups, 1))
        return codes * scale + offset


# kind AFFINE_KIND + G: int8 codes with a float32 scale and offset per group of G = 16 or 32 inputs (GGUF's Q2_K,
# Q5_K, Q6_K; pagoda_quant_gemm's kAffineKind)
AFFINE_KIND = 300  # above every ZERO_KIND + group
AFFINE_GROUPS = (16, 32)
AFFINE_KINDS = tuple(AFFINE_KIND + g for g in AFFINE_GROUPS)


def pad_to_tiles(n: int, *rows: torch.Tensor | None) -> tuple[int, list[torch.Tensor | None]]:
    """The number of 16-column tiles covering ``n`` output columns, and each of ``rows`` (tensors whose first
    dimension is ``n``; ``None`` passes through) padded with zero rows to whole tiles: padded columns have zero codes,
    scales and offsets."""
    tiles = -(-n // 16)
    pad = tiles * 16 - n
    if not pad:
        return tiles, list(rows)
    return tiles, [None if t is None else torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in rows]


def tile_params(values: torch.Tensor, dtype: torch.dtype, tiles: int, groups: int) -> torch.Tensor:
    """Per-group parameters [tiles * 16, groups] as the packed kernels read them after each tile's codes: per tile
    and group, the 16 columns' values in ``dtype``, as bytes [tiles, groups, 16 * itemsize]."""
    return values.to(dtype).reshape(tiles, 16, groups).permute(0, 2, 1).contiguous().view(torch.uint8)


def pack_quantized(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> PackedQuant:
    """Pack ``codes`` [n, k] (uint8 0..15 for ``bits=4``, int8 for ``bits=8``) with ``scale``/``offset``
    [n, k / 32] (8-bit: float16-exact scales, no offset, as Q8_0); ``k`` a multiple of 32."""
    n, k = codes.shape
    groups = k // 32
    tiles, (codes, scale, offset) = pad_to_tiles(n, codes, scale, offset)
    c = codes.reshape(tiles, 16, groups, 16, 2)  # [tile, col, group, pair, element]
    if bits == 4:
        c = c.to(torch.uint8).permute(0, 2, 3, 1, 4)  # [tile, group, pair, col, element]
        code_bytes = (c[..., 0] | (c[..., 1] << 4)).reshape(tiles, groups, 256)
    elif bits == 8:
        if offset is not None:
            raise ValueError("8-bit codes take no offset")
        code_bytes = c.to(torch.int8).permute(0, 2, 3, 4, 1).reshape(tiles, groups, 512).view(torch.uint8)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")

    if bits == 4:
        params = [tile_params(scale, torch.float32, tiles, groups), tile_params(offset, torch.float32, tiles, groups)]
    else:
        params = [tile_params(scale, torch.float16, tiles, groups)]
    data = torch.cat([code_bytes, *params], dim=-1).contiguous()
    return PackedQuant(data, n, k, bits)


def quant_linear(x: torch.Tensor, weight: PackedQuant, float_output: bool = False, amx: bool = False) -> torch.Tensor:
    """``x @ W.T`` for bf16 ``x [..., k]`` and a packed block-quantized ``W``; float32 out when ``float_output``.
    ``amx``: batches of 8 rows and more on AMX tiles (only where the process may use them)."""
    x2 = _bf16_rows(x, weight.k, "quant_linear")
    rows = x2.shape[0]
    out = torch.empty(rows, weight.n, dtype=torch.float32 if float_output else torch.bfloat16)
    if rows:
        _check(kernels().quant_gemm(weight.bits, int(float_output), out.data_ptr(), x2.data_ptr(), weight.ptr, rows,
                                    weight.n, weight.k, _threads(), int(amx)), "pagoda_quant_gemm")
    return out if x.dim() == 2 else out.unflatten(0, x.shape[:-1])
