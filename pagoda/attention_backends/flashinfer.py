"""FLASHINFER: FlashInfer's paged prefill and decode wrappers (built-in plugin, CUDA).

Per step the builder ``plan``s two wrappers on FlashInfer's page-table form (CSR: ``indptr`` into a flat list
of page ids, plus the fill of each request's last page): a ``BatchDecodeWithPagedKVCacheWrapper`` for the
leading decodes and a ``BatchPrefillWithPagedKVCacheWrapper`` for the prefill chunks, whose causal mask
FlashInfer aligns to the end of each request's keys (query ``i`` of a chunk with ``c`` cached tokens sees keys
``0 .. c + i``). The plan needs the softmax scale, which belongs to the layers, so the first layer of a step
plans with its scale and the others reuse that plan (a layer with a different scale re-plans). The page
counts the plan reads on the host come from the common metadata's host copies. A model whose layers use different
sliding windows (Gemma 2/3) gets one pair of wrappers per window, each layer running its own window's; soft-capped
logits are FlashInfer's ``logits_soft_cap``.

Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]``; the ``(kv_cache[0], kv_cache[1])`` tuple
is FlashInfer's "NHD" paged cache. Install: ``pip install pagoda-llm[cuda]`` (``flashinfer-python``; its kernels
are compiled on first use for the GPU at hand).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagoda.attention_backends.interface import (AttentionBackend, AttentionConfig, AttentionImpl,
                                                 AttentionMetadataBuilder, CommonAttentionMetadata)
from pagoda.plugins.hookspecs import hookimpl

_WORKSPACE_BYTES = 128 * 1024 * 1024


@dataclass
class WindowPlan:
    """One window's wrappers and their plan() arguments (except sm_scale) for this step."""

    decode_wrapper: Any
    prefill_wrapper: Any
    decode_plan: dict[str, Any] | None  # None when there is no decode
    prefill_plan: dict[str, Any] | None
    planned_scale: float | None = None

    def ensure_planned(self, scale: float) -> None:
        if self.planned_scale == scale:
            return
        if self.decode_plan is not None:
            self.decode_wrapper.plan(**self.decode_plan, sm_scale=scale)
        if self.prefill_plan is not None:
            self.prefill_wrapper.plan(**self.prefill_plan, sm_scale=scale)
        self.planned_scale = scale


@dataclass
class FlashInferMetadata:
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    plans: dict[int | None, WindowPlan]  # sliding window (None: global) → its wrappers and plans


class FlashInferMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, config: AttentionConfig, device: torch.device) -> None:
        super().__init__(config, device)
        import flashinfer

        # One float workspace serves every wrapper: they run one after the other within a layer, and each
        # wrapper keeps its plan in its own integer workspace.
        workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers = {window: (flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD"),
                                   flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"))
                          for window in config.windows()}

    def _page_table(self, common: CommonAttentionMetadata, start: int, end: int):
        bs = self.config.block_size
        seq_lens = common.seq_lens_cpu[start:end].to(torch.int32)
        pages = (seq_lens + bs - 1) // bs
        indptr = torch.zeros(end - start + 1, dtype=torch.int32)
        torch.cumsum(pages, 0, out=indptr[1:])
        used = torch.arange(common.block_table.shape[1])[None, :] < pages[:, None]
        indices = common.block_table[start:end][used.to(common.block_table.device)].to(torch.int32)
        last_page_len = seq_lens - (pages - 1) * bs
        return indptr, indices, last_page_len

    def build(self, common: CommonAttentionMetadata) -> FlashInferMetadata:
        cfg = self.config
        nd, n = common.num_decodes, common.num_reqs
        cap = cfg.logits_soft_cap or 0.0  # FlashInfer's "off"
        decode_args = prefill_args = None
        if nd:
            indptr, indices, last = self._page_table(common, 0, nd)
            decode_args = dict(indptr=indptr, indices=indices, last_page_len=last, num_qo_heads=cfg.num_heads,
                               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_size, page_size=cfg.block_size,
                               logits_soft_cap=cap, q_data_type=cfg.dtype, kv_data_type=cfg.dtype)
        if n > nd:
            indptr, indices, last = self._page_table(common, nd, n)
            qo_indptr = (common.query_start_loc_cpu[nd:] - common.query_start_loc_cpu[nd]).to(torch.int32)
            prefill_args = dict(qo_indptr=qo_indptr, paged_kv_indptr=indptr, paged_kv_indices=indices,
                                paged_kv_last_page_len=last, num_qo_heads=cfg.num_heads,
                                num_kv_heads=cfg.num_kv_heads, head_dim_qk=cfg.head_size, page_size=cfg.block_size,
                                causal=True, logits_soft_cap=cap, q_data_type=cfg.dtype, kv_data_type=cfg.dtype)
        plans = {}
        for window, (decode, prefill) in self._wrappers.items():
            # FlashInfer's window_left counts the keys before the query's own position.
            left = window - 1 if window is not None else -1
            plans[window] = WindowPlan(decode, prefill,
                                       None if decode_args is None else {**decode_args, "window_left": left},
                                       None if prefill_args is None else {**prefill_args, "window_left": left})
        return FlashInferMetadata(common.slot_mapping, common.num_decode_tokens, plans)


class FlashInferImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: FlashInferMetadata) -> torch.Tensor:
        if kv_cache is None:
            raise ValueError("FLASHINFER needs a KV cache (encoder attention is not supported)")
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, key)
        value_cache.view(-1, self.num_kv_heads, self.head_size).index_copy_(0, metadata.slot_mapping, value)
        plan = metadata.plans[self.sliding_window]
        plan.ensure_planned(self.scale)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous, whatever query is
        nd = metadata.num_decode_tokens
        if plan.decode_plan is not None:
            out[:nd] = plan.decode_wrapper.run(query[:nd], (key_cache, value_cache))
        if plan.prefill_plan is not None:
            out[nd:] = plan.prefill_wrapper.run(query[nd:], (key_cache, value_cache))
        return out.view(query.shape[0], self.num_heads * self.head_size)


class FlashInferBackend(AttentionBackend):
    name = "FLASHINFER"
    platforms = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = (64, 128, 256)
    block_sizes = (16, 32, 64)
    kv_cache_layout = "NHD"
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supports_encoder = False
    extra = "cuda"
    requires = ("flashinfer", "flashinfer", "pip install pagoda-llm[cuda]")

    @classmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return FlashInferMetadataBuilder

    @classmethod
    def impl_cls(cls) -> type[AttentionImpl]:
        return FlashInferImpl


@hookimpl
def pagoda_register_attention_backends():
    return [FlashInferBackend]
