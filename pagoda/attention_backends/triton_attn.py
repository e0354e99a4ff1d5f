"""TRITON_ATTN: pagoda's own Triton kernels for paged prefill and decode (built-in plugin).

Runs on CUDA and ROCm GPUs, and on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the tests exercise it on machines without a GPU. The KV cache layout is the same as TORCH_SDPA's,
``[2, num_blocks, block_size, num_kv_heads, head_size]``. The kernels are in :mod:`.triton_kernels`, imported
on first use so that registering this backend never imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda import envs
from pagoda.attention_backends.interface import (AttentionBackend, AttentionConfig, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class TritonAttnMetadata:
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    num_reqs: int
    num_decodes: int
    max_prefill_query_len: int


class TritonAttnMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> TritonAttnMetadata:
        nd = common.num_decodes
        max_prefill = 0
        if common.num_reqs > nd:
            q_lens = common.query_start_loc_cpu[nd + 1:] - common.query_start_loc_cpu[nd:-1]
            max_prefill = int(q_lens.max())
        return TritonAttnMetadata(common.slot_mapping, common.block_table, common.query_start_loc,
                                  common.seq_lens, common.num_reqs, nd, max_prefill)


class TritonAttnImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from pagoda.attention_backends import triton_kernels

        self._kernels = triton_kernels

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: TritonAttnMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("TRITON_ATTN needs a KV cache (encoder attention is not supported)")
        num_tokens = query.shape[0]
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, key)
        value_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, value)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous, whatever query is
        nd = metadata.num_decodes
        if nd:
            self._kernels.paged_decode(out, query, key_cache, value_cache, metadata.block_table,
                                       metadata.seq_lens, nd, self.scale, self.sliding_window,
                                       self.logits_soft_cap)
        if metadata.num_reqs > nd:
            self._kernels.paged_prefill(out, query, key_cache, value_cache, metadata.block_table,
                                        metadata.query_start_loc, metadata.seq_lens, nd, metadata.num_reqs - nd,
                                        metadata.max_prefill_query_len, self.scale, self.sliding_window,
                                        self.logits_soft_cap)
        return out.view(num_tokens, self.num_heads * self.head_size)


class TritonAttnBackend(AttentionBackend):
    name = "TRITON_ATTN"
    platforms = ("cuda", "rocm", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # Any head size works (the tile is padded to a power of two); these are the ones models use.
    head_sizes = (16, 32, 40, 64, 80, 96, 112, 128, 160, 192, 256)
    # One block is one key tile: a power of two, at least 16 for tl.dot.
    block_sizes = (16, 32, 64)
    kv_cache_layout = "NHD"
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supports_encoder = False
    extra = "cuda"
    requires = ("triton", "triton", "pip install pagoda-llm[cuda]")

    @classmethod
    def extra_reasons(cls, config: AttentionConfig) -> list[str]:
        reasons = []
        if config.platform == "cpu":
            # Triton's own switch, read by Triton itself when the kernels are defined.
            if not envs.triton_interpret():
                reasons.append("on cpu only through Triton's interpreter (set TRITON_INTERPRET=1; for testing)")
        return reasons

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return TritonAttnMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return TritonAttnImpl


@hookimpl
def pagoda_register_attention_backends():
    return [TritonAttnBackend]
