"""The layout of one flat token batch — each request's tokens one after another, one-token requests (decodes)
first — as the attention backends' builders take it: positions, the KV slot of every token, and the step's
:class:`CommonAttentionMetadata`. The model runner and the speculative draft model both lay out their batches
through it."""

from __future__ import annotations

import functools

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
    if num_tokens == num_reqs:  # one token per request: the steady state
        return starts, decode_batch_metadata(starts, block_table, block_size, device, causal)
    # Per-token request index and position, without a Python loop over tokens.
    req_index = np.repeat(np.arange(num_reqs), counts)
    positions = np.arange(num_tokens) - np.repeat(query_start_loc[:-1], counts) + np.repeat(starts, counts)
    slot_mapping = block_table[req_index, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    ends = starts + counts
    num_decodes = int(np.count_nonzero(counts == 1))  # they come first
    qsl_cpu = torch.from_numpy(query_start_loc)
    seq_lens_cpu = torch.from_numpy(ends.astype(np.int32))
    metadata = CommonAttentionMetadata(
        num_reqs=num_reqs, num_tokens=num_tokens, num_decodes=num_decodes,
        num_decode_tokens=num_decodes, max_query_len=int(counts.max()),
        max_seq_len=int(ends.max()), query_start_loc=qsl_cpu.to(device), query_start_loc_cpu=qsl_cpu,
        seq_lens=seq_lens_cpu.to(device), seq_lens_cpu=seq_lens_cpu,
        num_computed_tokens_cpu=torch.from_numpy(starts.astype(np.int32)),
        block_table=torch.from_numpy(np.ascontiguousarray(block_table)).to(device),
        slot_mapping=torch.from_numpy(slot_mapping).to(device), causal=causal)
    return positions, metadata


def decode_batch_metadata(starts: np.ndarray, block_table: np.ndarray, block_size: int, device: torch.device | str,
                          causal: bool = True) -> CommonAttentionMetadata:
    """The metadata of a decode-only batch: request i's one token at position ``starts[i]``. The steady state of
    every engine, built in few array operations: it runs between two model steps that have just streamed the
    weights through the caches, where each operation costs several microseconds more than it does warm."""
    num_reqs = starts.shape[0]
    query_start_loc, query_start_loc_dev, rows = _decode_query_layout(num_reqs, device)
    blocks, offsets = np.divmod(starts, block_size)
    slot_mapping = np.multiply(block_table[rows, blocks], block_size, dtype=np.int64)
    slot_mapping += offsets
    seq_lens = np.add(starts, 1, dtype=np.int32)
    seq_lens_cpu = torch.from_numpy(seq_lens)
    on_host = query_start_loc_dev is query_start_loc  # tensors made from host arrays are already in place
    table = torch.from_numpy(np.ascontiguousarray(block_table))
    slots = torch.from_numpy(slot_mapping)
    return CommonAttentionMetadata(
        num_reqs=num_reqs, num_tokens=num_reqs, num_decodes=num_reqs, num_decode_tokens=num_reqs, max_query_len=1,
        max_seq_len=int(seq_lens.max()), query_start_loc=query_start_loc_dev, query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens_cpu if on_host else seq_lens_cpu.to(device), seq_lens_cpu=seq_lens_cpu,
        num_computed_tokens_cpu=torch.from_numpy(seq_lens - 1),
        block_table=table if on_host else table.to(device), slot_mapping=slots if on_host else slots.to(device),
        causal=causal)


@functools.lru_cache(maxsize=64)
def _decode_query_layout(num_reqs: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``query_start_loc`` of ``num_reqs`` one-token requests (0, 1, …, num_reqs) on the host and on ``device``
    (the same tensor where the device is the host), and the row indices 0 … num_reqs - 1. Shared by every step of
    that size: nothing writes into them."""
    query_start_loc = torch.arange(num_reqs + 1, dtype=torch.int32)
    on_device = query_start_loc.to(device)
    return query_start_loc, on_device, np.arange(num_reqs)
