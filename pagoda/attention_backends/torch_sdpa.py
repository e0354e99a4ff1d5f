"""TORCH_SDPA: paged attention with ``torch.nn.functional.scaled_dot_product_attention`` (built-in plugin).

Runs on any platform torch runs on. The KV cache of a layer is one tensor
``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys, then values).

* Decodes (one query token each) on the CPU in float32/bfloat16 run pagoda's native paged-decode kernel
  (:mod:`pagoda.kernels.cpu`), which reads the blocks in place through the block table. Elsewhere (or with
  ``PAGODA_CPU_KERNELS=0``) they are batched into a single SDPA call: their blocks are gathered with one index
  op into ``[num_decodes, num_kv_heads, max_len, head_size]`` and a padding mask hides the tail of shorter
  contexts. Grouped-query heads are folded into the query length (``[n, kv_heads, group, d]``) so no
  key/value head is ever repeated.
* Prefill chunks attend to their request's cached context (prefix-cache hits and earlier chunks) plus their
  own tokens, causally. In bf16 on the CPU all of a step's chunks go to pagoda's native prefill kernel in one
  call, reading the keys and values in place from the cache; elsewhere each chunk is one SDPA call, and a
  prefill with nothing cached uses the fresh keys directly with ``is_causal``.
* New keys and values are written to the cache by a native row copy where the kernels are built
  (``index_copy_`` otherwise).
* Encoder (bidirectional, no cache) batches run one SDPA call per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.attention_backends.interface import (AttentionBackend, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.kernels import cpu as cpu_kernels
from pagoda.kernels import cpu_ops
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class PrefillSpan:
    """One request's prefill chunk: its tokens in the flat batch and its context in the cache."""

    token_start: int
    token_end: int
    num_computed: int  # tokens cached before this chunk
    seq_len: int  # num_computed + chunk length
    block_ids: torch.Tensor | None  # blocks covering seq_len (None when nothing was cached)


@dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    # Native kernel: the decodes' block-table rows and context lengths, read in place.
    decode_block_table: torch.Tensor | None  # int32 [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor | None  # int32 [num_decodes]
    # SDPA path: the decodes' blocks gathered and masked.
    decode_block_ids: torch.Tensor | None  # [num_decodes * blocks]: the decodes' block tables, flattened
    decode_mask: torch.Tensor | None  # bool [num_decodes, 1, 1, blocks * block_size]
    prefills: list[PrefillSpan]
    causal: bool
    # Native kernel: all prefill chunks in one call (decodes come first; the prefills' rows of the batch).
    prefill_table: torch.Tensor | None = None  # int32 [num_prefills, max_blocks]
    prefill_query_start_loc: torch.Tensor | None = None  # int32 [num_prefills + 1], from the first prefill token
    prefill_seq_lens: torch.Tensor | None = None  # int32 [num_prefills]


def native_decode_available(config, device: torch.device) -> bool:
    """Whether decodes of this model run on the native CPU kernel."""
    return (device.type == "cpu" and config.dtype in cpu_kernels.DTYPE_CODES and config.kv_cache_dtype == "auto"
            and cpu_kernels.kernels() is not None)


class SdpaMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self.native_decode = native_decode_available(config, device)

    def build(self, common: CommonAttentionMetadata) -> SdpaMetadata:
        block_size = self.config.block_size
        nd = common.num_decodes
        decode_ids = decode_mask = decode_table = decode_lens = None
        if nd and common.causal and self.native_decode:
            decode_table, decode_lens = common.block_table[:nd], common.seq_lens[:nd]
        elif nd and common.causal:
            seq_lens = common.seq_lens[:nd]
            max_len = int(common.seq_lens_cpu[:nd].max())
            num_blocks = -(-max_len // block_size)
            decode_ids = common.block_table[:nd, :num_blocks].flatten()
            positions = torch.arange(num_blocks * block_size, device=seq_lens.device)
            mask = positions[None, :] < seq_lens[:, None]
            if self.config.sliding_window is not None:
                mask &= positions[None, :] >= (seq_lens[:, None] - self.config.sliding_window)
            decode_mask = mask[:, None, None, :]
        prefills = []
        qsl = common.query_start_loc_cpu.tolist()
        seq_lens_cpu = common.seq_lens_cpu.tolist()
        computed = common.num_computed_tokens_cpu.tolist()
        first = nd if common.causal else 0
        for i in range(first, common.num_reqs):
            block_ids = None
            if computed[i] > 0 and common.causal:
                block_ids = common.block_table[i, : -(-seq_lens_cpu[i] // block_size)]
            prefills.append(PrefillSpan(qsl[i], qsl[i + 1], computed[i], seq_lens_cpu[i], block_ids))
        meta = SdpaMetadata(common.slot_mapping, nd if common.causal else 0, decode_table, decode_lens, decode_ids,
                            decode_mask, prefills, common.causal)
        if prefills and common.causal and self.native_decode and self.config.dtype == torch.bfloat16:
            meta.prefill_table = common.block_table[nd:]
            meta.prefill_query_start_loc = common.query_start_loc[nd:] - common.query_start_loc[nd]
            meta.prefill_seq_lens = common.seq_lens[nd:]
        return meta


class SdpaImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: SdpaMetadata) -> torch.Tensor:
        num_tokens = query.shape[0]
        if kv_cache is not None and not cpu_ops.write_kv(kv_cache[0], kv_cache[1], key, value, metadata.slot_mapping):
            key_cache = kv_cache[0].view(-1, self.num_kv_heads, self.head_size)
            value_cache = kv_cache[1].view(-1, self.num_kv_heads, self.head_size)
            key_cache.index_copy_(0, metadata.slot_mapping, key)
            value_cache.index_copy_(0, metadata.slot_mapping, value)
        nd = metadata.num_decodes
        if nd and nd == num_tokens:  # a decode-only step: the decode output is the whole output
            return self._decode(query, kv_cache, metadata).view(num_tokens, self.num_heads * self.head_size)
        prefilled = None
        if metadata.prefill_table is not None:  # every prefill chunk in one native call, reading the cache
            prefilled = cpu_ops.prefill_attention(query[nd:], kv_cache[0], kv_cache[1], metadata.prefill_table,
                                                  metadata.prefill_query_start_loc, metadata.prefill_seq_lens,
                                                  self.scale, self.sliding_window)
            if prefilled is not None and not nd:
                return prefilled.view(num_tokens, self.num_heads * self.head_size)
        out = torch.empty(num_tokens, self.num_heads, self.head_size, dtype=query.dtype, device=query.device)
        if nd:
            out[:nd] = self._decode(query[:nd], kv_cache, metadata)
        if prefilled is not None:
            out[nd:] = prefilled
        else:
            for span in metadata.prefills:
                out[span.token_start:span.token_end] = self._prefill(query, key, value, kv_cache, span,
                                                                     metadata.causal)
        return out.view(num_tokens, self.num_heads * self.head_size)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: SdpaMetadata) -> torch.Tensor:
        if metadata.decode_block_table is not None:
            out = cpu_ops.decode_attention(query, kv_cache[0], kv_cache[1], metadata.decode_block_table,
                                           metadata.decode_seq_lens, self.scale, self.sliding_window)
            if out is None:
                raise RuntimeError("the native decode kernel rejected tensors its builder accepted: "
                                   f"query {query.dtype} {tuple(query.shape)}, cache {kv_cache.dtype}")
            return out
        nd = query.shape[0]
        group = self.num_heads // self.num_kv_heads
        ids = metadata.decode_block_ids
        # index_select (several times faster than advanced indexing) → [nd, blocks*block_size, kvh, d]
        # → [nd, kvh, blocks*block_size, d]
        keys = kv_cache[0].index_select(0, ids).view(nd, -1, self.num_kv_heads, self.head_size).transpose(1, 2)
        values = kv_cache[1].index_select(0, ids).view(nd, -1, self.num_kv_heads, self.head_size).transpose(1, 2)
        q = query.view(nd, self.num_kv_heads, group, self.head_size)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=metadata.decode_mask, scale=self.scale)
        return o.reshape(nd, self.num_heads, self.head_size)

    def _prefill(self, query, key, value, kv_cache, span: PrefillSpan, causal: bool) -> torch.Tensor:
        s, e = span.token_start, span.token_end
        q = query[s:e].transpose(0, 1)  # [H, q_len, d]
        if span.block_ids is None:
            k, v = key[s:e].transpose(0, 1), value[s:e].transpose(0, 1)
            mask = None
            if causal and self.sliding_window is not None:
                mask = self._mask(e - s, 0, e - s, q.device)
            o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               is_causal=causal and mask is None, scale=self.scale,
                                               enable_gqa=self.num_heads != self.num_kv_heads)
            return o[0].transpose(0, 1)
        k = kv_cache[0].index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len].transpose(0, 1)
        v = kv_cache[1].index_select(0, span.block_ids).flatten(0, 1)[: span.seq_len].transpose(0, 1)
        mask = self._mask(e - s, span.num_computed, span.seq_len, q.device)
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                           scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)

    def _mask(self, q_len: int, num_computed: int, seq_len: int, device: torch.device) -> torch.Tensor:
        q_pos = torch.arange(num_computed, num_computed + q_len, device=device)[:, None]
        k_pos = torch.arange(seq_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask


class TorchSdpaBackend(AttentionBackend):
    name = "TORCH_SDPA"
    platforms = None
    supports_sliding_window = True
    supports_encoder = True

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return SdpaMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return SdpaImpl


@hookimpl
def pagoda_register_attention_backends():
    return [TorchSdpaBackend]
