"""The flat batch layout (positions, KV slots and attention metadata), decode-only and mixed, checked against a
token-by-token Python computation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagoda.core.flat_batch import flat_batch_layout

BLOCK_SIZE = 16


def _expected(counts: list[int], starts: list[int], table: np.ndarray) -> dict[str, list[int]]:
    positions, slots = [], []
    for i, (count, start) in enumerate(zip(counts, starts)):
        for position in range(start, start + count):
            positions.append(position)
            slots.append(int(table[i, position // BLOCK_SIZE]) * BLOCK_SIZE + position % BLOCK_SIZE)
    return {"positions": positions, "slots": slots, "seq_lens": [s + c for s, c in zip(starts, counts)],
            "query_start_loc": np.concatenate([[0], np.cumsum(counts)]).tolist()}


@pytest.mark.parametrize("decode_only", [True, False], ids=["decode-only", "mixed"])
def test_layout_matches_token_by_token(decode_only: bool):
    rng = random.Random(3)
    for num_reqs in (1, 5, 64, 5):  # 5 twice: the decode-only layout keeps per-size arrays between calls
        if decode_only:
            counts = [1] * num_reqs
        else:  # decodes first, then prefill chunks
            counts = sorted((rng.choice([1, rng.randrange(2, 40)]) for _ in range(num_reqs)), key=lambda c: c != 1)
            counts[-1] = max(counts[-1], 2)
        starts = [rng.randrange(0, 200) for _ in range(num_reqs)]
        width = max((s + c + BLOCK_SIZE - 1) // BLOCK_SIZE for s, c in zip(starts, counts))
        table = np.asarray([rng.sample(range(1, 5000), width) for _ in range(num_reqs)], dtype=np.int32)
        counts_np, starts_np = np.asarray(counts, dtype=np.int64), np.asarray(starts, dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(counts_np, out=query_start_loc[1:])
        positions, meta = flat_batch_layout(counts_np, starts_np, query_start_loc, table, BLOCK_SIZE, "cpu")
        want = _expected(counts, starts, table)
        assert positions.tolist() == want["positions"]
        assert meta.slot_mapping.tolist() == want["slots"]
        assert meta.seq_lens.tolist() == meta.seq_lens_cpu.tolist() == want["seq_lens"]
        assert meta.num_computed_tokens_cpu.tolist() == starts
        assert meta.query_start_loc.tolist() == meta.query_start_loc_cpu.tolist() == want["query_start_loc"]
        assert meta.block_table.tolist() == table.tolist()
        assert (meta.num_reqs, meta.num_tokens) == (num_reqs, sum(counts))
        assert meta.num_decodes == meta.num_decode_tokens == counts.count(1)
        assert meta.max_query_len == max(counts) and meta.max_seq_len == max(want["seq_lens"])
        assert str(meta.slot_mapping.dtype) == "torch.int64" and str(meta.seq_lens.dtype) == "torch.int32"
        assert str(meta.query_start_loc.dtype) == "torch.int32"
