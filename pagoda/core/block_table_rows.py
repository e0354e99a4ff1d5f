"""The model runner's host block table, kept from step to step (one row per running request)."""

from __future__ import annotations

import numpy as np


def block_runs(ids: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering the distinct ``ids``, one per run of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class BlockTableRows:
    """The host block table, kept from step to step: one row per request, written only when its block list
    changes, so a step gathers its rows in one indexing operation instead of rebuilding the table from lists.
    Entries past a request's blocks are 0 (block 0 pads block tables)."""

    def __init__(self, num_rows: int, num_cols: int) -> None:
        self.table = np.zeros((max(num_rows, 1), max(num_cols, 1)), dtype=np.int32)
        self.lengths = np.zeros(self.table.shape[0], dtype=np.int64)
        self._free_rows = list(range(self.table.shape[0] - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        """A row for a new request, holding ``block_ids``."""
        if not self._free_rows:
            old = self.table.shape[0]
            self._grow(2 * old, self.table.shape[1])
            self._free_rows = list(range(self.table.shape[0] - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.set(row, block_ids)
        return row

    def set(self, row: int, block_ids: list[int]) -> None:
        num, old = len(block_ids), int(self.lengths[row])
        if num > self.table.shape[1]:
            self._grow(self.table.shape[0], max(num, 2 * self.table.shape[1]))
        self.table[row, :num] = block_ids
        if old > num:
            self.table[row, num:old] = 0
        self.lengths[row] = num

    def release(self, row: int) -> None:
        self.set(row, [])
        self._free_rows.append(row)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The block table of a step's requests (in ``rows`` order), as wide as the longest block list of any row:
        a request's tail columns are 0 (padding), and the width costs no per-step pass over the step's rows."""
        return self.table[rows, : max(int(self.lengths.max()), 1)]

    def _grow(self, num_rows: int, num_cols: int) -> None:
        table = np.zeros((num_rows, num_cols), dtype=np.int32)
        table[: self.table.shape[0], : self.table.shape[1]] = self.table
        lengths = np.zeros(num_rows, dtype=np.int64)
        lengths[: self.lengths.shape[0]] = self.lengths
        self.table, self.lengths = table, lengths
