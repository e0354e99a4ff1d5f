"""Paged-attention test cases built by hand: a paged KV cache, CommonAttentionMetadata, and a float64
reference computed from the unpaged keys and values.

A case is a list of requests ``(num_computed, query_len)``; requests with one query token (decodes) must come
first, as the model runner orders them. The cached context of every request is written through the backend
itself in a warm-up step (any KV-cache layout works that way), and the checked step then attends to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig, CommonAttentionMetadata

CASES: dict[str, list[tuple[int, int]]] = {
    "prefill": [(0, 7), (0, 20)],
    "prefix_hit": [(16, 5), (32, 9)],
    "chunked": [(13, 6), (37, 11)],
    "decode": [(5, 1), (16, 1), (40, 1)],
    "mixed": [(9, 1), (31, 1), (0, 6), (20, 12)],
    # Several query tiles per request and contexts over many blocks.
    "long": [(70, 1), (0, 70), (40, 33)],
}

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@dataclass
class Request:
    num_computed: int
    query_len: int
    block_ids: list[int]

    @property
    def seq_len(self) -> int:
        return self.num_computed + self.query_len


def make_metadata(requests: list[Request], block_size: int, max_blocks: int,
                  device: torch.device) -> CommonAttentionMetadata:
    """The runner's per-step layout for ``requests`` (see the diagram in attention_backends/interface.py)."""
    q_lens = [r.query_len for r in requests]
    num_decodes = 0
    while num_decodes < len(requests) and q_lens[num_decodes] == 1:
        num_decodes += 1
    assert all(q > 1 for q in q_lens[num_decodes:]), "decodes must come first"
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    seq_lens = torch.tensor([r.seq_len for r in requests], dtype=torch.int32)
    table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    slots = []
    for i, r in enumerate(requests):
        table[i, : len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
        for pos in range(r.num_computed, r.seq_len):
            slots.append(r.block_ids[pos // block_size] * block_size + pos % block_size)
    return CommonAttentionMetadata(
        num_reqs=len(requests), num_tokens=int(qsl[-1]), num_decodes=num_decodes, num_decode_tokens=num_decodes,
        max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()), query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl, seq_lens=seq_lens.to(device), seq_lens_cpu=seq_lens,
        num_computed_tokens_cpu=torch.tensor([r.num_computed for r in requests], dtype=torch.int32),
        block_table=table.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_computed: int, scale: float,
              sliding_window: int | None, soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention in float64 of ``q`` [q_len, H, d] over the whole sequence ``k``/``v`` [seq, KVH, d]
    (logits soft-capped to ``cap * tanh(s / cap)`` with ``soft_cap``)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    q_pos = torch.arange(num_computed, num_computed + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(backend: type[AttentionBackend], config: AttentionConfig, case: list[tuple[int, int]],
             device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``case`` through ``backend`` and return (backend output, float64 reference), both [tokens, H, d], for
    a layer with the model-wide window ``config.sliding_window``."""
    return run_layers(backend, config, case, device, seed)[config.sliding_window]


def run_layers(backend: type[AttentionBackend], config: AttentionConfig, case: list[tuple[int, int]],
               device: torch.device, seed: int = 0) -> dict[int | None, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``case`` through one layer per window of ``config.windows()``, all on the same step's metadata (as
    the layers of a model that mixes windowed and global ones share it); window → (output, reference)."""
    gen = torch.Generator().manual_seed(seed)
    bs, kvh, h, d = config.block_size, config.num_kv_heads, config.num_heads, config.head_size
    seq_lens = [c + q for c, q in case]
    blocks_needed = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    # Scatter each request over non-contiguous physical blocks (block 0 stays unused, as a null block would).
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    requests, offset = [], 0
    for (computed, q_len), n in zip(case, blocks_needed):
        requests.append(Request(computed, q_len, perm[offset: offset + n]))
        offset += n
    keys = [torch.randn(s, kvh, d, generator=gen) for s in seq_lens]
    values = [torch.randn(s, kvh, d, generator=gen) for s in seq_lens]
    queries = [torch.randn(q, h, d, generator=gen) for _, q in case]
    keys, values, queries = ([t.to(config.dtype) for t in ts] for ts in (keys, values, queries))

    scale = d ** -0.5
    impls = {window: backend.impl_cls()(h, d, scale, kvh, window, config) for window in config.windows()}
    builder = backend.builder_cls()(config, device)
    # Stale data in unused slots must never leak into the output: fill them with a large finite value (NaN
    # would be stricter, but a cache of finite stale data is what reused blocks hold).
    kv_cache = torch.full(backend.kv_cache_shape(num_blocks, bs, kvh, d), 100.0, dtype=config.dtype,
                          device=device)
    max_blocks = max(blocks_needed) + 1

    def step(reqs: list[Request], q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor]):
        """Every layer's output on one step's metadata (each layer writes the same keys and values)."""
        common = make_metadata(reqs, bs, max_blocks, device)
        metadata = builder.build(common)
        q, k, v = (torch.cat(t).to(device) for t in (q, k, v))
        return {window: layer.forward(q, k, v, kv_cache, metadata).view(-1, h, d) for window, layer in impls.items()}

    # Warm-up: write every request's cached context (a prefill of those tokens, decodes-first order).
    warm = [(i, r) for i, r in enumerate(requests) if r.num_computed > 0]
    warm.sort(key=lambda ir: ir[1].num_computed != 1)
    if warm:
        step([Request(0, r.num_computed, r.block_ids) for _, r in warm],
             [torch.randn(r.num_computed, h, d, generator=gen).to(config.dtype) for _, r in warm],
             [keys[i][: r.num_computed] for i, r in warm], [values[i][: r.num_computed] for i, r in warm])
    outs = step(requests, queries, [k[r.num_computed:] for k, r in zip(keys, requests)],
                [v[r.num_computed:] for v, r in zip(values, requests)])
    return {window: (out.cpu(), torch.cat([reference(q, k, v, r.num_computed, scale, window, config.logits_soft_cap)
                                           for q, k, v, r in zip(queries, keys, values, requests)]))
            for window, out in outs.items()}
