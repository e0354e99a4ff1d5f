"""TORCH_SDPA: paged attention through the engine's attention ops (built-in plugin).

Runs on any platform torch runs on. The KV cache of a layer is one tensor
``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys, then values). The arithmetic is the ops':

* ``write_kv`` stores the step's new keys and values at the slot mapping;
* ``paged_decode_attention`` attends the decodes (one query token each; they come first) to their cached
  context — planned once per step by the builder, run by every layer;
* ``prefill_attention`` attends the prefill chunks to their cached context (prefix-cache hits, earlier chunks)
  and their own tokens, causally — likewise planned once per step.

Models that interleave windowed and global layers (Gemma 2/3) get one plan of each op per distinct window, and
each layer runs the plan of its own window; soft-capped logits are passed to the ops' ``run``.

The reference implementations (:mod:`pagoda.ops.reference_attention`) are torch's
``scaled_dot_product_attention`` over gathered blocks; a platform's own (pagoda's CPU kernels read the cache in
place) are chosen by the op registry. Encoder (bidirectional, no cache) batches run one SDPA call per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pagoda.attention_backends.interface import (AttentionBackend, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.ops import current_ops
from pagoda.plugins.hookspecs import hookimpl


@dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_plans: dict[int | None, Any]  # window → the paged_decode_attention op's plan for the decodes
    prefill_plans: dict[int | None, Any]  # window → the prefill_attention op's plan for the rest (causal steps)
    prefills: list[tuple[int, int]]  # (token_start, token_end) of each non-decode request
    causal: bool


class SdpaMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        ops = current_ops()
        self.decode_op, self.prefill_op = ops.paged_decode_attention, ops.prefill_attention
        self.windows = config.windows()

    def build(self, common: CommonAttentionMetadata) -> SdpaMetadata:
        block_size = self.config.block_size
        nd = common.num_decodes if common.causal else 0
        decode_plans: dict[int | None, Any] = {}
        prefill_plans: dict[int | None, Any] = {}
        qsl = common.query_start_loc_cpu.tolist() if nd < common.num_reqs else []  # decode-only steps need none
        prefills = [(qsl[i], qsl[i + 1]) for i in range(nd, common.num_reqs)]
        decodes = (common.block_table, common.seq_lens, common.seq_lens_cpu)
        if nd < common.num_reqs:
            decodes = tuple(t[:nd] for t in decodes)
        for window in self.windows:
            if nd:
                decode_plans[window] = self.decode_op.plan(*decodes, block_size, window)
            if prefills and common.causal:
                first = qsl[nd]
                prefill_plans[window] = self.prefill_op.plan(
                    common.block_table[nd:], common.query_start_loc[nd:] - first, common.seq_lens[nd:],
                    [q - first for q in qsl[nd:]], common.seq_lens_cpu[nd:].tolist(),
                    common.num_computed_tokens_cpu[nd:].tolist(), block_size, window)
        return SdpaMetadata(common.slot_mapping, nd, decode_plans, prefill_plans, prefills, common.causal)


class SdpaImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ops = current_ops()
        self.write_kv, self.decode_op, self.prefill_op = ops.write_kv, ops.paged_decode_attention, \
            ops.prefill_attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: SdpaMetadata) -> torch.Tensor:
        num_tokens = query.shape[0]
        if not metadata.causal:
            return self._encode(query, key, value, metadata).view(num_tokens, self.num_heads * self.head_size)
        self.write_kv(kv_cache[0], kv_cache[1], key, value, metadata.slot_mapping)
        nd = metadata.num_decodes
        cap = self.logits_soft_cap
        if nd == num_tokens:  # a decode-only step: the decode output is the whole output
            return self.decode_op.run(query, kv_cache[0], kv_cache[1], self._plan(metadata.decode_plans),
                                      self.scale, cap).view(num_tokens, -1)
        prefilled = self.prefill_op.run(query[nd:], key[nd:], value[nd:], kv_cache[0], kv_cache[1],
                                        self._plan(metadata.prefill_plans), self.scale, cap)
        if not nd:
            return prefilled.view(num_tokens, -1)
        out = torch.empty(num_tokens, self.num_heads, self.head_size, dtype=query.dtype, device=query.device)
        out[:nd] = self.decode_op.run(query[:nd], kv_cache[0], kv_cache[1], self._plan(metadata.decode_plans),
                                      self.scale, cap)
        out[nd:] = prefilled
        return out.view(num_tokens, -1)

    def _plan(self, plans: dict[int | None, Any]) -> Any:
        plan = plans.get(self.sliding_window)
        if plan is None:
            raise ValueError(f"attention layer with sliding window {self.sliding_window} but the step was planned "
                             f"for windows {list(plans)}: the AttentionConfig must list every layer's window")
        return plan

    def _encode(self, query, key, value, metadata: SdpaMetadata) -> torch.Tensor:
        """Bidirectional attention within each sequence (encoders: no cache, no mask)."""
        out = torch.empty_like(query)
        gqa = self.num_heads != self.num_kv_heads
        for s, e in metadata.prefills:
            q, k, v = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            out[s:e] = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=gqa)[0].transpose(0, 1)
        return out


class TorchSdpaBackend(AttentionBackend):
    name = "TORCH_SDPA"
    platforms = None
    supports_sliding_window = True
    supports_logits_soft_cap = True
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
