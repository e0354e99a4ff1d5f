"""FLASH_ATTN: the flash-attn package's varlen kernel over the paged cache (built-in plugin, CUDA).

One ``flash_attn_varlen_func`` call per layer covers the whole mixed batch: queries are packed by
``query_start_loc``, keys and values are read from the paged cache through ``block_table`` with
``cu_seqlens_k`` built from ``seq_lens``, and flash-attn's causal mask is aligned to the bottom right, so query
``i`` of a request with ``c`` cached tokens sees keys ``0 .. c + i``: prefix hits, chunks and decodes alike.

Upstream flash-attn 2 reads a paged cache only when its block size is a multiple of 256, so this backend
needs ``--block-size 256`` (or larger); with smaller blocks its ``validate`` says so and the CUDA platform
moves on to the next backend in its list. flash-attn ships as a source distribution that compiles against
the installed torch: ``pip install flash-attn --no-build-isolation`` (see docs/plugins.md).

Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]``; ``kv_cache[0]``/``[1]`` are the
``[num_blocks, page_block_size, nheads_k, headdim]`` tensors flash-attn expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionConfig, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class FlashAttnMetadata:
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_table: torch.Tensor


class FlashAttnMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> FlashAttnMetadata:
        cu_seqlens_k = torch.zeros(common.num_reqs + 1, dtype=torch.int32, device=common.seq_lens.device)
        torch.cumsum(common.seq_lens, 0, out=cu_seqlens_k[1:])
        return FlashAttnMetadata(common.slot_mapping, common.query_start_loc, cu_seqlens_k, common.max_query_len,
                                 common.max_seq_len, common.block_table)


class FlashAttnImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func
        # flash-attn's window is inclusive on both ends: (left, right) keys around the query's own position.
        self._window = (self.sliding_window - 1, 0) if self.sliding_window is not None else (-1, -1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: FlashAttnMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("FLASH_ATTN needs a KV cache (encoder attention is not supported)")
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, key)
        value_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, value)
        out = self._varlen(query, key_cache, value_cache, cu_seqlens_q=metadata.query_start_loc,
                           cu_seqlens_k=metadata.cu_seqlens_k, max_seqlen_q=metadata.max_query_len,
                           max_seqlen_k=metadata.max_seq_len, softmax_scale=self.scale, causal=True,
                           window_size=self._window, softcap=self.logits_soft_cap or 0.0,
                           block_table=metadata.block_table)
        return out.view(query.shape[0], self.num_heads * self.head_size)


class FlashAttnBackend(AttentionBackend):
    name = "FLASH_ATTN"
    platforms = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = (32, 64, 96, 128, 160, 192, 224, 256)
    block_sizes = (256, 512)
    kv_cache_layout = "NHD"
    supports_sliding_window = True
    supports_logits_soft_cap = True  # flash_attn_varlen_func's softcap (flash-attn 2.6 and newer)
    supports_encoder = False
    extra = "cuda"
    requires = ("flash_attn", "flash-attn", "pip install flash-attn --no-build-isolation (it compiles against the "
                "installed CUDA torch, see docs/plugins.md)")

    @classmethod
    def extra_reasons(cls, config: AttentionConfig) -> list[str]:
        reasons = []
        if config.platform == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
            reasons.append("flash-attn 2 needs compute capability 8.0 or newer (Ampere)")
        return reasons

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return FlashAttnMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return FlashAttnImpl


@hookimpl
def pagoda_register_attention_backends():
    return [FlashAttnBackend]
