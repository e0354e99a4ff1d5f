"""IPEX: intel-extension-for-pytorch's paged attention (built-in plugin, Intel XPU and CPU).

``ipex.llm.modules.PagedAttention.flash_attn_varlen_func`` takes the whole mixed batch at once (queries packed
by ``cu_seqlens_q``, keys read from the paged cache through the block table, ``cu_seqlens_kv`` from the
sequence lengths, causal mask aligned to the end of each request's keys).

Cache layout: ``[2, num_blocks, num_kv_heads, block_size, head_size]`` ("HND", the layout IPEX's paged kernels
read). This step's keys and values are written with one indexed assignment per tensor. Install:
``pip install pagoda-llm[xpu]`` (or ``intel-extension-for-pytorch`` matching the torch version on a CPU host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class IpexMetadata:
    slot_block: torch.Tensor  # int64 [num_tokens]: block of each new token
    slot_offset: torch.Tensor  # int64 [num_tokens]: its offset inside the block
    query_start_loc: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_table: torch.Tensor


class IpexMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> IpexMetadata:
        bs = self.config.block_size
        cu_seqlens_kv = torch.zeros(common.num_reqs + 1, dtype=torch.int32, device=common.seq_lens.device)
        torch.cumsum(common.seq_lens, 0, out=cu_seqlens_kv[1:])
        return IpexMetadata(common.slot_mapping // bs, common.slot_mapping % bs, common.query_start_loc,
                            cu_seqlens_kv, common.max_query_len, common.max_seq_len, common.block_table)


class IpexImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import intel_extension_for_pytorch as ipex

        self._paged = ipex.llm.modules.PagedAttention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: IpexMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("IPEX needs a KV cache (encoder attention is not supported)")
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache[metadata.slot_block, :, metadata.slot_offset] = key
        value_cache[metadata.slot_block, :, metadata.slot_offset] = value
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous, whatever query is
        self._paged.flash_attn_varlen_func(out, query.contiguous(), key_cache, value_cache,
                                           metadata.query_start_loc, metadata.cu_seqlens_kv, metadata.max_query_len,
                                           metadata.max_seq_len, self.scale, True, metadata.block_table, None)
        return out.view(query.shape[0], self.num_heads * self.head_size)


class IpexBackend(AttentionBackend):
    name = "IPEX"
    platforms = ("xpu", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_sizes = (64, 80, 96, 112, 128, 256)
    block_sizes = (16, 32, 64)
    kv_cache_layout = "HND"
    supports_sliding_window = False
    logits_soft_cap_reason = "IPEX's paged attention takes no soft cap"
    supports_encoder = False
    extra = "xpu"
    requires = ("intel_extension_for_pytorch", "intel-extension-for-pytorch", "pip install pagoda-llm[xpu]")

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return IpexMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return IpexImpl


@hookimpl
def pagoda_register_attention_backends():
    return [IpexBackend]
