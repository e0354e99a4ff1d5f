"""One step's grammar constraints, as the model runner applies them: a token bitmask with a row per constrained
request that samples this step (bit ``t`` of a row set: token ``t`` allowed), filled by the manager before the
step runs.

Rows of the runner's sampling batch are matched to bitmask rows by request id (every sample of a request that
forks shares its row). Sampling with logits: the masks go onto the logits, batched, before the sampler, so every
sampling feature sees only allowed tokens. All-greedy steps hand the masks to the LM head's argmax
(``compute_greedy(hidden, allowed)``), which on the native CPU kernels skips the forbidden columns as it finds each
row's maximum — no logits are written for a constrained greedy row either; a model whose head can't returns None
and the step takes the logits path.
"""

from __future__ import annotations

from typing import Any

import torch


class StepGrammar:
    def __init__(self, bitmask: torch.Tensor, rows: dict[str, int], vocab_size: int) -> None:
        self.bitmask = bitmask  # int32 [constrained rows, ceil(vocab / 32)], on the host
        self.rows = rows  # request id → its bitmask row
        self.vocab_size = vocab_size

    def _constrained(self, owners: list[Any]) -> tuple[list[int], list[int]]:
        """(sampling rows that are constrained, their bitmask rows)."""
        rows = self.rows
        sample_rows, mask_rows = [], []
        for i, owner in enumerate(owners):
            row = rows.get(owner.request_id)
            if row is not None:
                sample_rows.append(i)
                mask_rows.append(row)
        return sample_rows, mask_rows

    def apply_to_logits(self, logits: torch.Tensor, owners: list[Any]) -> torch.Tensor:
        """Set the logits of forbidden tokens to -inf, in place, for every constrained row (``owners[i]`` is the
        runner state whose request row ``i`` samples for)."""
        sample_rows, mask_rows = self._constrained(owners)
        if not sample_rows:
            return logits
        self._mask(logits, sample_rows, mask_rows)
        return logits

    def rows_bitmask(self, owners: list[Any]) -> torch.Tensor | None:
        """The step's bitmask laid out like the sampling rows (an all-allowed row for each unconstrained one), for
        an LM head that finds the argmax over the allowed tokens itself; None when no row is constrained."""
        sample_rows, mask_rows = self._constrained(owners)
        return self._aligned(len(owners), sample_rows, mask_rows) if sample_rows else None

    def _aligned(self, num_rows: int, rows: list[int], mask_rows: list[int]) -> torch.Tensor:
        """A bitmask of ``num_rows`` rows whose row ``rows[i]`` is the step's ``mask_rows[i]`` and every other row
        allows all tokens (the step's own bitmask where it already is that)."""
        if len(rows) == num_rows and mask_rows == list(range(len(mask_rows))):
            return self.bitmask[:len(mask_rows)]
        aligned = torch.full((num_rows, self.bitmask.shape[1]), -1, dtype=self.bitmask.dtype)
        aligned[torch.tensor(rows)] = self.bitmask[torch.tensor(mask_rows)]
        return aligned

    def _mask(self, logits: torch.Tensor, logit_rows: list[int], mask_rows: list[int]) -> None:
        import xgrammar as xgr

        # xgrammar applies row i of the mask to row i of the logits.
        aligned = self._aligned(logits.shape[0], logit_rows, mask_rows)
        indices = None if len(logit_rows) == logits.shape[0] else logit_rows
        xgr.apply_token_bitmask_inplace(logits, aligned.to(logits.device, non_blocking=True),
                                        vocab_size=min(self.vocab_size, logits.shape[-1]), indices=indices)
