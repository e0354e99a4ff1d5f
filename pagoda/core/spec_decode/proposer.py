"""The proposer interface: after a step, draft tokens for the requests that just got new tokens.

The runner keeps one proposer. It is told about each request it may draft for (``add_request``) and when the
request ends or must be rebuilt after preemption (``remove_request``); after each step it is asked for drafts of
the requests that sampled. ``draft_probs`` gives the distribution each draft token was sampled from, where it
is not a point mass (the n-gram proposer's drafts are deterministic: q is one-hot, so it returns None).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Proposer(Protocol):
    def add_request(self, state: Any) -> None:
        """A request (the runner's ``RunnerRequestState``) drafts will be asked for; called again after a
        preemption, when its KV cache has to be rebuilt."""

    def remove_request(self, request_id: str) -> None:
        """Forget a request (finished, aborted)."""

    def propose(self, states: list[Any], block_table: Any, num_blocks: Any) -> dict[str, list[int]]:
        """Up to k draft tokens for each request in ``states`` (their ``token_ids`` include this step's tokens);
        requests without a proposal are left out. ``block_table`` gathers the requests' block rows and
        ``num_blocks`` their lengths (only the draft model uses them: it writes its own KV into the same slots as
        the target)."""

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        """``[num_drafts, vocab]`` float32 probabilities the request's last drafts were sampled from, or None
        when they were chosen deterministically (one-hot q)."""
