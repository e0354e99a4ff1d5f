"""The layout of one flat token batch — each request's tokens one after another, one-token requests (decodes)
first — as the attention backends' builders take it: positions, the KV slot of every token, and the step's
:class:`CommonAttentionMetadata`. The model runner and the speculative draft model both lay out their batches
through it."""

from __future__ import annotations

import numpy as np
import torch

from pagoda.attention_backends.interface import CommonAttentionMetadata


def flat_batch_layout(counts: np.ndarray, starts: np.ndarray, query_start_loc: np.ndarray, block_table: np.ndarray,
                      block_size: int, device: torch.device | str, causal: bool = True
                      ) -> tuple[np.ndarray, CommonAttentionMetadata]:
    """``counts[i]`` tokens of request i from position ``starts[i]``, its blocks in row i of ``block_table``
    (``query_start_loc``: the cumulative counts, from 0). Returns every token's position and the metadata."""
    num_reqs = counts.shape[0]
    num_tokens = int(query_start_loc[-1])
    decodes_only = num_tokens == num_reqs  # one token per request: the steady state, kept to few array operations
    # Per-token request index and position, without a Python loop over tokens.
    if decodes_only:
        blocks, offsets = np.divmod(starts, block_size)
        slot_mapping = block_table[np.arange(num_reqs), blocks].astype(np.int64)
        slot_mapping *= block_size
        slot_mapping += offsets
        positions, ends = starts, starts + 1
        num_decodes, max_query_len = num_reqs, 1
    else:
        req_index = np.repeat(np.arange(num_reqs), counts)
        positions = np.arange(num_tokens) - np.repeat(query_start_loc[:-1], counts) + np.repeat(starts, counts)
        slot_mapping = block_table[req_index, positions // block_size].astype(np.int64) * block_size \
            + positions % block_size
        ends = starts + counts
        num_decodes, max_query_len = int(np.count_nonzero(counts == 1)), int(counts.max())
    qsl_cpu = torch.from_numpy(query_start_loc)
    seq_lens_cpu = torch.from_numpy(ends.astype(np.int32))
    metadata = CommonAttentionMetadata(
        num_reqs=num_reqs, num_tokens=num_tokens, num_decodes=num_decodes, num_decode_tokens=num_decodes,
        max_query_len=max_query_len, max_seq_len=int(ends.max()),
        query_start_loc=qsl_cpu.to(device), query_start_loc_cpu=qsl_cpu,
        seq_lens=seq_lens_cpu.to(device), seq_lens_cpu=seq_lens_cpu,
        num_computed_tokens_cpu=torch.from_numpy(starts.astype(np.int32)),
        block_table=torch.from_numpy(np.ascontiguousarray(block_table)).to(device),
        slot_mapping=torch.from_numpy(slot_mapping).to(device), causal=causal)
    return positions, metadata
