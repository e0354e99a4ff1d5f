"""Reference paged-attention ops: ``torch.nn.functional.scaled_dot_product_attention`` over gathered blocks.

Both ops are planned once per step (``plan``: what every layer shares — block lists, masks) and run once per
layer (``run``). The caches are ``[num_blocks, block_size, kv_heads, head_size]`` per layer for keys and values.
Grouped-query heads are folded into the query length so no key/value head is ever repeated. SDPA can't
soft-cap attention logits (Gemma 2), so with ``soft_cap`` set both ops take an explicit float32 path
(:func:`softcapped_attention`) with the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.ops.interface import OpImpl


@dataclass
class DecodePlan:
    block_table: torch.Tensor  # int32 [n, max_blocks]
    seq_lens: torch.Tensor  # int32 [n]
    sliding_window: int | None
    block_ids: torch.Tensor | None = None  # the blocks to gather, flattened [n * blocks]
    mask: torch.Tensor | None = None  # bool [n, 1, 1, blocks * block_size]


class PagedDecodeAttention(OpImpl):
    op, name, is_reference = "paged_decode_attention", "torch", True

    def plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, block_size: int,
             sliding_window: int | None) -> DecodePlan:
        """``block_table`` int32 [n, max_blocks] and ``seq_lens`` int32 [n] (context including this token) of the
        step's decodes, on the device; ``seq_lens_cpu`` the same lengths on the host."""
        plan = DecodePlan(block_table, seq_lens, sliding_window)
        num_blocks = -(-int(seq_lens_cpu.max()) // block_size)
        plan.block_ids = block_table[:, :num_blocks].flatten()
        positions = torch.arange(num_blocks * block_size, device=seq_lens.device)
        mask = positions[None, :] < seq_lens[:, None]
        if sliding_window is not None:
            mask &= positions[None, :] >= (seq_lens[:, None] - sliding_window)
        plan.mask = mask[:, None, None, :]
        return plan

    def run(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, plan: DecodePlan,
            scale: float, soft_cap: float | None = None) -> torch.Tensor:
        """``query`` [n, heads, d] → ``[n, heads, d]``; ``soft_cap``: logits become ``cap * tanh(logits / cap)``
        before the softmax."""
        n, heads, d = query.shape
        kv_heads = key_cache.shape[2]
        # index_select (several times faster than advanced indexing) → [n, blocks*block_size, kvh, d] → [n, kvh, L, d]
        keys = key_cache.index_select(0, plan.block_ids).view(n, -1, kv_heads, d).transpose(1, 2)
        values = value_cache.index_select(0, plan.block_ids).view(n, -1, kv_heads, d).transpose(1, 2)
        q = query.reshape(n, kv_heads, heads // kv_heads, d)
        if soft_cap is not None:
            return softcapped_attention(q, keys, values, plan.mask, scale, soft_cap).reshape(n, heads, d)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask, scale=scale)
        return o.reshape(n, heads, d)


@dataclass
class PrefillSpan:
    """One request's prefill chunk: its rows among the step's prefill tokens and its context in the cache."""

    token_start: int
    token_end: int
    num_computed: int  # tokens cached before this chunk
    seq_len: int  # num_computed + chunk length
    block_ids: torch.Tensor | None  # blocks covering seq_len (None when nothing was cached before)


@dataclass
class PrefillPlan:
    spans: list[PrefillSpan]
    sliding_window: int | None
    block_table: torch.Tensor | None = None  # int32 [num_prefills, max_blocks] (for implementations that read it)
    query_start_loc: torch.Tensor | None = None  # int32 [num_prefills + 1], from the first prefill token
    seq_lens: torch.Tensor | None = None  # int32 [num_prefills]


class PrefillAttention(OpImpl):
    op, name, is_reference = "prefill_attention", "torch", True

    def plan(self, block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
             query_start_loc_cpu: list[int], seq_lens_cpu: list[int], num_computed_cpu: list[int], block_size: int,
             sliding_window: int | None) -> PrefillPlan:
        """The step's prefill requests: block-table rows, ``query_start_loc`` (int32 [n + 1], starting at 0 with
        the first prefill token) and ``seq_lens`` (int32 [n], context after this chunk) on the device, and the same
        as host lists together with the tokens cached before each chunk."""
        spans = []
        for i, (start, end) in enumerate(zip(query_start_loc_cpu[:-1], query_start_loc_cpu[1:])):
            computed, seq_len = num_computed_cpu[i], seq_lens_cpu[i]
            ids = block_table[i, : -(-seq_len // block_size)] if computed > 0 else None
            spans.append(PrefillSpan(start, end, computed, seq_len, ids))
        return PrefillPlan(spans, sliding_window, block_table, query_start_loc, seq_lens)

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
            value_cache: torch.Tensor, plan: PrefillPlan, scale: float,
            soft_cap: float | None = None) -> torch.Tensor:
        """``query`` [tokens, heads, d] and this step's ``key``/``value`` [tokens, kv_heads, d] (already in the
        cache) → ``[tokens, heads, d]``; ``soft_cap`` as in :meth:`PagedDecodeAttention.run`."""
        out = torch.empty_like(query)
        spans = plan.spans
        i = 0
        while i < len(spans):
            # Consecutive fresh prompts of one length (a burst of new requests) attend in one batched call.
            j = i
            while (j + 1 < len(spans) and spans[j + 1].block_ids is None and spans[i].block_ids is None
                   and plan.sliding_window is None and soft_cap is None
                   and spans[j + 1].token_start == spans[j].token_end
                   and spans[j + 1].token_end - spans[j + 1].token_start == spans[i].token_end - spans[i].token_start):
                j += 1
            if j > i:
                s, e, n = spans[i].token_start, spans[j].token_end, j - i + 1
                out[s:e] = self.attend_batch(query[s:e], key[s:e], value[s:e], n, scale)
            else:
                out[spans[i].token_start:spans[i].token_end] = self.attend_span(
                    query, key, value, key_cache, value_cache, spans[i], scale, plan.sliding_window, soft_cap)
            i = j + 1
        return out

    @staticmethod
    def attend_batch(query, key, value, n: int, scale: float) -> torch.Tensor:
        """Causal attention of ``n`` equal-length fresh prompts laid end to end: one SDPA call on [n, H, L, d]."""
        q, k, v = (t.unflatten(0, (n, -1)).transpose(1, 2) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2).flatten(0, 1)

    @staticmethod
    def attend_span(query, key, value, key_cache, value_cache, span: PrefillSpan, scale: float,
                    sliding_window: int | None, soft_cap: float | None = None) -> torch.Tensor:
        s, e = span.token_start, span.token_end
        gqa = query.shape[1] != key.shape[1]
        q = query[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, d]
        if soft_cap is not None:
            if span.block_ids is None:
                k, v = key[s:e], value[s:e]
            else:
                k = key_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len]
                v = value_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len]
            mask = causal_mask(e - s, span.num_computed, span.seq_len, sliding_window, q.device)
            o = softcapped_attention(q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), mask, scale,
                                     soft_cap)
            return o[0].transpose(0, 1)
        if span.block_ids is None:
            k, v = key[s:e].transpose(0, 1), value[s:e].transpose(0, 1)
            mask = None if sliding_window is None else causal_mask(e - s, 0, e - s, sliding_window, q.device)
            o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               is_causal=mask is None, scale=scale, enable_gqa=gqa)
            return o[0].transpose(0, 1)
        k = key_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len].transpose(0, 1)
        v = value_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len].transpose(0, 1)
        mask = causal_mask(e - s, span.num_computed, span.seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
        return o[0].transpose(0, 1)


def causal_mask(q_len: int, num_computed: int, seq_len: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(num_computed, num_computed + q_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                         soft_cap: float) -> torch.Tensor:
    """Attention with soft-capped logits, in float32: ``q`` [B, H, Lq, d], ``k``/``v`` [B, KVH, Lk, d] (KVH
    divides H), ``mask`` bool broadcastable to [B, H, Lq, Lk] (True: may attend) → ``[B, H, Lq, d]`` in ``q``'s
    dtype."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
