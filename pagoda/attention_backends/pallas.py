"""PALLAS: torch_xla's ragged paged attention Pallas kernel (built-in plugin, TPU).

``torch.ops.xla.ragged_paged_attention`` takes the whole mixed batch at once (queries packed by
``cu_q_lens``, per-request ``kv_lens`` and ``page_indices``), with its causal mask aligned to the end of each
request's keys, so prefix hits, chunks and decodes need no separate paths.

Cache layout: ``[1, num_blocks, block_size, 2 * num_kv_heads, head_size]``; ``kv_cache[0]`` is the kernel's
page array, keys and values interleaved per head (``k0, v0, k1, v1, ...``). The leading 1 keeps blocks on
dimension 1, as for every backend, so the engine copies blocks the same way whatever the backend. Install:
``pip install pagoda-llm[tpu]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class PallasMetadata:
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    num_seqs: torch.Tensor  # int32 [1], on the device (the kernel reads it there)


class PallasMetadataBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> PallasMetadata:
        num_seqs = torch.tensor([common.num_reqs], dtype=torch.int32, device=self.device)
        return PallasMetadata(common.slot_mapping, common.seq_lens, common.block_table, common.query_start_loc,
                              num_seqs)


class PallasImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import torch_xla.experimental.custom_kernel  # noqa: F401  (registers torch.ops.xla.*)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: PallasMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("PALLAS needs a KV cache (encoder attention is not supported)")
        kvh, d = self.num_kv_heads, self.head_size
        # [tokens, kvh, 2, d] -> [tokens, 2*kvh, d] interleaves k and v per head, as the kernel expects.
        kv = torch.stack([key, value], dim=2).view(-1, 2 * kvh, d)
        pages = kv_cache[0]
        pages.view(-1, 2 * kvh, d).index_copy_(0, metadata.slot_mapping, kv)
        out = torch.ops.xla.ragged_paged_attention(
            query, pages, metadata.seq_lens, metadata.block_table, metadata.query_start_loc, metadata.num_seqs,
            sm_scale=self.scale, sliding_window=self.sliding_window)
        return out.reshape(query.shape[0], self.num_heads * d)


class PallasBackend(AttentionBackend):
    name = "PALLAS"
    platforms = ("tpu",)
    dtypes = (torch.bfloat16, torch.float32)
    # The kernel tiles the head dimension by the TPU lane width.
    head_sizes = (128, 256)
    block_sizes = (16, 32, 64, 128)
    kv_cache_layout = "NHD, K/V interleaved"
    supports_sliding_window = True
    logits_soft_cap_reason = "pagoda does not pass a soft cap to the ragged paged-attention kernel"
    supports_encoder = False
    extra = "tpu"
    requires = ("torch_xla", "torch_xla", "pip install pagoda-llm[tpu]")

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (1, num_blocks, block_size, 2 * num_kv_heads, head_size)

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return PallasMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return PallasImpl


@hookimpl
def pagoda_register_attention_backends():
    return [PallasBackend]
