"""XFORMERS: xformers' memory-efficient attention over the gathered paged cache (built-in plugin, CUDA).

xformers has no paged kernel, so each step the builder computes, once for all layers, the cache slots of every
request's whole context; each layer gathers its keys and values with one index op into a packed
``[total_context, num_kv_heads, head_size]`` sequence and runs one ``memory_efficient_attention_forward`` over
the batch with a block-diagonal mask whose causal diagonal is aligned to the bottom right of each block
(``BlockDiagonalCausalFromBottomRightMask``): query ``i`` of a request with ``c`` cached tokens sees keys
``0 .. c + i``. Grouped-query heads use xformers' 5-D ``[B, M, G, H, K]`` form, so keys are broadcast, not copied.

Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]``. Install: ``pip install pagoda-llm[cuda]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionConfig, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class XformersMetadata:
    slot_mapping: torch.Tensor
    context_slots: torch.Tensor  # int64 [sum(seq_lens)]: cache slot of every context token, request by request
    attn_biases: dict[int | None, Any]  # sliding window (None: global) → its causal mask


class XformersMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> XformersMetadata:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bs = self.config.block_size
        seq_lens = common.seq_lens.long()
        total = int(common.seq_lens_cpu.sum())
        device = common.seq_lens.device
        # For every context token: its request and its position in that request.
        req = torch.repeat_interleave(torch.arange(common.num_reqs, device=device), seq_lens, output_size=total)
        starts = torch.cumsum(seq_lens, 0) - seq_lens
        pos = torch.arange(total, device=device) - starts[req]
        context_slots = common.block_table[req, pos // bs].long() * bs + pos % bs
        q_lens = (common.query_start_loc_cpu[1:] - common.query_start_loc_cpu[:-1]).tolist()
        blocks = BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=common.seq_lens_cpu.tolist())
        biases = {window: blocks.make_local_attention_from_bottomright(window) if window is not None
                  else blocks.make_causal_from_bottomright() for window in self.config.windows()}
        return XformersMetadata(common.slot_mapping, context_slots, biases)


class XformersImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from xformers.ops import memory_efficient_attention_forward

        self._attend = memory_efficient_attention_forward

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: XformersMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("XFORMERS needs a KV cache (encoder attention is not supported)")
        kvh, d = self.num_kv_heads, self.head_size
        key_cache, value_cache = kv_cache[0].view(-1, kvh, d), kv_cache[1].view(-1, kvh, d)
        key_cache.index_copy_(0, metadata.slot_mapping, key)
        value_cache.index_copy_(0, metadata.slot_mapping, value)
        group = self.num_heads // kvh
        n_ctx = metadata.context_slots.shape[0]
        k = key_cache[metadata.context_slots].view(1, n_ctx, kvh, 1, d).expand(1, n_ctx, kvh, group, d)
        v = value_cache[metadata.context_slots].view(1, n_ctx, kvh, 1, d).expand(1, n_ctx, kvh, group, d)
        q = query.view(1, query.shape[0], kvh, group, d)
        out = self._attend(q, k, v, attn_bias=metadata.attn_biases[self.sliding_window], scale=self.scale)
        return out.reshape(query.shape[0], self.num_heads * d)


class XformersBackend(AttentionBackend):
    name = "XFORMERS"
    platforms = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_sizes = None  # checked in extra_reasons: a multiple of 8 up to 256
    block_sizes = None
    kv_cache_layout = "NHD"
    supports_sliding_window = True
    logits_soft_cap_reason = "xformers' memory-efficient attention has no logit soft-capping"
    supports_encoder = False
    extra = "cuda"
    requires = ("xformers", "xformers", "pip install pagoda-llm[cuda]")

    @classmethod
    def extra_reasons(cls, config: AttentionConfig) -> list[str]:
        reasons = []
        if config.head_size % 8 or config.head_size > 256:
            reasons.append(f"head size {config.head_size} is not a multiple of 8 up to 256")
        return reasons

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return XformersMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return XformersImpl


@hookimpl
def pagoda_register_attention_backends():
    return [XformersBackend]
