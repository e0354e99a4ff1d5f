"""N-gram (prompt lookup) proposer, as vLLM's ``ngram`` method.

For each request, the longest suffix of its tokens (between ``prompt_lookup_max`` and ``prompt_lookup_min``
tokens) that also occurs earlier in the prompt or output is looked up, and the up to k tokens that followed its
first occurrence are the drafts. Input-grounded generation (quoting, editing, summarising a passage) repeats
long runs of the input, which this finds at no model cost.

Tokens are kept in a growing numpy buffer per request (only the new tokens are copied each step) and the match
search is one vectorised comparison of every window of n tokens per n, not a loop over positions.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagoda.core.spec_decode.config import SpeculativeConfig


class _TokenBuffer:
    __slots__ = ("array", "length")

    def __init__(self) -> None:
        self.array = np.empty(256, dtype=np.int64)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The request's tokens as an array, copying only what was appended since the last call."""
        num = len(token_ids)
        if num < self.length:  # rebuilt (preemption): start again
            self.length = 0
        if num > self.array.shape[0]:
            grown = np.empty(max(num, 2 * self.array.shape[0]), dtype=np.int64)
            grown[: self.length] = self.array[: self.length]
            self.array = grown
        if num > self.length:
            self.array[self.length:num] = token_ids[self.length:]
            self.length = num
        return self.array[:num]


def find_ngram_proposal(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The up to ``k`` tokens after the first earlier occurrence of the longest suffix of ``tokens`` of
    ``min_n``..``max_n`` tokens; empty when no such suffix recurs."""
    total = tokens.shape[0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # Windows starting at 0 .. total - n - 1: every earlier occurrence that has a token after it.
        windows = sliding_window_view(tokens[: total - 1], n)
        suffix = tokens[total - n:]
        # Filter on the first token before comparing whole windows: most positions fail there.
        candidates = np.flatnonzero(windows[:, 0] == suffix[0])
        if candidates.size == 0:
            continue
        matches = candidates[(windows[candidates] == suffix).all(axis=1)]
        if matches.size:
            start = int(matches[0]) + n
            return tokens[start:start + k]
    return tokens[:0]


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._buffers: dict[str, _TokenBuffer] = {}

    def add_request(self, state) -> None:
        self._buffers.pop(state.request_id, None)

    def remove_request(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)

    def propose(self, states, block_table=None, num_blocks=None) -> dict[str, list[int]]:
        proposals = {}
        for state in states:
            buffer = self._buffers.get(state.request_id)
            if buffer is None:
                buffer = self._buffers[state.request_id] = _TokenBuffer()
            drafts = find_ngram_proposal(buffer.sync(state.token_ids), self.min_n, self.max_n, self.k)
            if drafts.size:
                proposals[state.request_id] = drafts.tolist()
        return proposals

    def draft_probs(self, request_id: str) -> None:
        return None
