"""Triton kernels of the TRITON_ATTN backend: paged prefill and paged decode over an NHD block cache.

Both kernels read every key and value from the paged cache (this step's keys are written there first), so a
prefill chunk with a prefix-cache hit or earlier chunks is the same case as a fresh prompt with
``context_len = 0``. Softmax is the streaming (online) form in float32, in base 2 (``exp2``) with the scale
folded into ``log2(e)``; one physical block is one key tile, so the block table is read once per tile. With
``SOFT_CAP`` the scaled logits ``s`` become ``cap * tanh(s / cap)`` (Gemma 2) before the softmax: ``soft_cap``
is the cap times ``log2(e)``, in the base-2 units the scores are kept in.

* ``_prefill_kernel``: one program per (prefill request, query head, tile of ``BLOCK_M`` query tokens).
  Query token ``i`` of a request sits at position ``context_len + i`` and sees keys ``<=`` that position.
  A tile stops at the last key any of its rows can see, so causal work above the diagonal is skipped.
* ``_decode_kernel``: one program per (decode request, KV head); the ``group`` query heads sharing that KV
  head are the rows of one tile, so each key/value block is loaded once for the whole group (GQA).

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU through Triton's interpreter (tests). The interpreter
computes half-precision arithmetic wrongly on CPU tensors, so there the loaded tiles are widened to float32
first (``UPCAST``); on a GPU the dots take bf16/fp16 operands with a float32 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda import envs

LOG2E = 1.4426950408889634


@triton.jit
def _soft_cap(s, cap):
    """``cap * tanh(s / cap)``, with tanh as ``1 - 2 / (exp(2x) + 1)`` (exact at both saturations, and the same
    code on every target and in the interpreter)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))


@triton.jit
def _prefill_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr,
                    seq_lens_ptr, qk_scale, soft_cap, sliding_window, req_offset,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, USE_WINDOW: tl.constexpr,
                    SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    req = tl.program_id(0) + req_offset
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len
    kv_head = head // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_SIZE)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_SIZE
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_M)
    first_block = 0
    if USE_WINDOW:
        first_block = tl.maximum(context_len + tile * BLOCK_M - sliding_window + 1, 0) // BLOCK_SIZE
    for j in range(first_block, tl.cdiv(kv_end, BLOCK_SIZE)):
        block = tl.load(block_table_ptr + req * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + offs_n
        in_seq = k_pos < seq_len
        cache_off = block * stride_cb + offs_n[:, None] * stride_cs + kv_head * stride_ch + offs_d[None, :]
        # Slots past seq_len may hold stale or uninitialised data: never let it reach the dot products.
        k = tl.load(k_cache_ptr + cache_off, mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_cache_ptr + cache_off, mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFT_CAP:
            s = _soft_cap(s, soft_cap)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, qk_scale, soft_cap,
                   sliding_window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                   stride_bt, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, USE_WINDOW: tl.constexpr,
                   SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    req = tl.program_id(0)  # decodes come first, so the request index is the token index
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    q_pos = seq_len - 1

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_SIZE)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_SIZE
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + req.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first_block = 0
    if USE_WINDOW:
        first_block = tl.maximum(seq_len - sliding_window, 0) // BLOCK_SIZE
    for j in range(first_block, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_table_ptr + req * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + offs_n
        in_seq = k_pos < seq_len
        if USE_WINDOW:
            in_seq = in_seq & (k_pos > q_pos - sliding_window)
        cache_off = block * stride_cb + offs_n[:, None] * stride_cs + kv_head * stride_ch + offs_d[None, :]
        k = tl.load(k_cache_ptr + cache_off, mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_cache_ptr + cache_off, mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFT_CAP:
            s = _soft_cap(s, soft_cap)
        s = tl.where(in_seq[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + req.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


def interpreting() -> bool:
    return envs.triton_interpret()


def _common(query: torch.Tensor, k_cache: torch.Tensor, scale: float, sliding_window: int | None,
            soft_cap: float | None):
    upcast = interpreting()
    # fp32 operands would otherwise be rounded to tf32 on GPUs; keep them exact.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    head_size = query.shape[-1]
    return dict(qk_scale=scale * LOG2E, soft_cap=(soft_cap or 1.0) * LOG2E, sliding_window=sliding_window or 0,
                stride_cb=k_cache.stride(0), stride_cs=k_cache.stride(1), stride_ch=k_cache.stride(2),
                HEAD_SIZE=head_size, BLOCK_D=max(16, triton.next_power_of_2(head_size)),
                BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None, SOFT_CAP=soft_cap is not None,
                UPCAST=upcast,
                DOT_PRECISION=precision)


def paged_prefill(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  first_req: int, num_prefills: int, max_query_len: int, scale: float,
                  sliding_window: int | None, soft_cap: float | None = None) -> None:
    """Attention of requests ``first_req .. first_req + num_prefills`` into ``out`` [tokens, heads, d].

    ``k_cache``/``v_cache`` are [num_blocks, block_size, num_kv_heads, head_size] with a contiguous last dim.
    """
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    block_m = 16 if max_query_len <= 16 else 32 if max_query_len <= 32 else 64
    grid = (num_prefills, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](out, query, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                          req_offset=first_req, stride_qt=query.stride(0), stride_qh=query.stride(1),
                          stride_ot=out.stride(0), stride_oh=out.stride(1), stride_bt=block_table.stride(0),
                          GROUP=num_heads // num_kv_heads, BLOCK_M=block_m,
                          **_common(query, k_cache, scale, sliding_window, soft_cap))


def paged_decode(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int, scale: float,
                 sliding_window: int | None, soft_cap: float | None = None) -> None:
    """Attention of the first ``num_decodes`` tokens (one per request) into ``out`` [tokens, heads, d]."""
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    _decode_kernel[(num_decodes, num_kv_heads)](
        out, query, k_cache, v_cache, block_table, seq_lens, stride_qt=query.stride(0),
        stride_qh=query.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=block_table.stride(0), GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        **_common(query, k_cache, scale, sliding_window, soft_cap))
