"""Attention backend ``EXAMPLE_ATTN``: paged attention in a few tensor ops, computed in float32.

Every query token gathers its request's whole (padded) context from the paged cache with one index op, and one
masked softmax covers the batch: simple and loop-free, with memory ``tokens x max_seq_len x heads``, so it is
meant for small batches and for showing the contract, not for speed.

Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionConfig, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)


@dataclass
class ExampleAttnMetadata:
    slot_mapping: torch.Tensor
    context_slots: torch.Tensor  # int64 [num_tokens, max_seq_len]: cache slot of each key position
    visible: torch.Tensor  # bool [num_tokens, max_seq_len]: which of those keys the token attends to


class ExampleAttnMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> ExampleAttnMetadata:
        bs = self.config.block_size
        device = common.slot_mapping.device
        q_lens = common.query_start_loc[1:] - common.query_start_loc[:-1]
        req = torch.repeat_interleave(torch.arange(common.num_reqs, device=device), q_lens,
                                      output_size=common.num_tokens)
        # Position of each query token = tokens cached before this step + its index in the step's chunk.
        first_pos = (common.seq_lens - q_lens)[req]
        q_pos = first_pos + torch.arange(common.num_tokens, device=device) - common.query_start_loc[req]
        k_pos = torch.arange(common.max_seq_len, device=device)
        blocks = common.block_table[req][:, k_pos // bs].long()
        context_slots = blocks * bs + k_pos % bs
        visible = k_pos[None, :] <= q_pos[:, None]  # also keeps keys below seq_len
        if self.config.sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - self.config.sliding_window
        return ExampleAttnMetadata(common.slot_mapping, context_slots, visible)


class ExampleAttnImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: ExampleAttnMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("EXAMPLE_ATTN needs a KV cache")
        kvh, d = self.num_kv_heads, self.head_size
        key_cache, value_cache = kv_cache[0].view(-1, kvh, d), kv_cache[1].view(-1, kvh, d)
        key_cache.index_copy_(0, metadata.slot_mapping, key)
        value_cache.index_copy_(0, metadata.slot_mapping, value)
        n = query.shape[0]
        group = self.num_heads // kvh
        k = key_cache[metadata.context_slots].float()  # [n, L, kvh, d]
        # Zero the values the mask hides: stale slots may hold anything, and 0 * NaN would still be NaN.
        v = value_cache[metadata.context_slots].float().masked_fill(~metadata.visible[:, :, None, None], 0.0)
        q = query.float().view(n, kvh, group, d)
        scores = torch.einsum("nhgd,nlhd->nhgl", q, k) * self.scale
        scores = scores.masked_fill(~metadata.visible[:, None, None, :], float("-inf"))
        out = torch.einsum("nhgl,nlhd->nhgd", scores.softmax(-1), v)
        return out.reshape(n, self.num_heads * d).to(query.dtype)


class ExampleAttentionBackend(AttentionBackend):
    name = "EXAMPLE_ATTN"
    platforms = ("example", "cpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    head_sizes = None
    block_sizes = None
    supports_sliding_window = True
    supports_encoder = False

    @classmethod
    def extra_reasons(cls, config: AttentionConfig) -> list[str]:
        if config.num_heads % config.num_kv_heads:
            return [f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}"]
        return []

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return ExampleAttnMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return ExampleAttnImpl
