"""The model runner's persistent host block table, checked against the table built from the block lists."""

from __future__ import annotations

import random

import numpy as np

from pagoda.core.block_table_rows import BlockTableRows, block_runs


def _expected(lists: list[list[int]]) -> np.ndarray:
    width = max(max(len(b) for b in lists), 1)
    table = np.zeros((len(lists), width), dtype=np.int32)
    for i, blocks in enumerate(lists):
        table[i, : len(blocks)] = blocks
    return table


def test_rows_follow_block_lists_through_growth_shrinking_and_reuse():
    rng = random.Random(7)
    rows = BlockTableRows(num_rows=2, num_cols=3)  # small, so that rows and columns must grow
    live: dict[int, list[int]] = {}
    for _ in range(300):
        action = rng.random()
        if action < 0.4 or not live:
            blocks = [rng.randrange(1000) for _ in range(rng.randrange(0, 9))]
            live[rows.add(blocks)] = blocks
        elif action < 0.7:
            row = rng.choice(list(live))
            live[row] = [rng.randrange(1000) for _ in range(rng.randrange(0, 9))]  # longer or shorter
            rows.set(row, live[row])
        else:
            row = rng.choice(list(live))
            del live[row]
            rows.release(row)
        if live:
            order = list(live)
            rng.shuffle(order)
            gathered = rows.gather(np.asarray(order))
            expected = _expected([live[r] for r in order])
            # Columns past the longest list may exist; they are padding (0) like the rest of each row's tail.
            assert np.array_equal(gathered[:, : expected.shape[1]], expected)
            assert not gathered[:, expected.shape[1]:].any()
    assert len(set(live)) == len(live)


def test_runs_of_consecutive_block_ids():
    assert block_runs([5, 3, 4, 9, 10, 4, 0]) == [(0, 1), (3, 6), (9, 11)]
    assert block_runs([]) == []
