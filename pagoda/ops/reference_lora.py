"""The reference ``lora_shrink_expand`` op: many LoRA adapters applied in one batch, in plain torch.

As punica's SGMV kernels do it: a step's tokens are grouped by adapter slot once (``plan``, a stable sort of the
per-token slot indices), and each layer's ``apply`` runs one shrink (``x @ A.T``) and one expand
(``@ B.T * scale``) per slot that has tokens, adding the delta into the base layer's output. Python loops only
over the (at most ``max_loras``) slots, never over requests or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops.interface import OpImpl


@dataclass
class LoRAPlan:
    """A step's tokens grouped by slot: grouped row ``j`` is token ``token[j]``; ``counts[s]`` rows per slot."""

    token: torch.Tensor  # [N]: tokens that have an adapter, sorted by slot (stable)
    counts: list[int]  # [num_slots]
    num_tokens: int
    single_slot: int | None  # every token in this one slot: no gather or scatter needed


class LoRAShrinkExpand(OpImpl):
    op, name, is_reference = "lora_shrink_expand", "torch", True

    def plan(self, token_slots: torch.Tensor, num_slots: int) -> LoRAPlan:
        """Group a step's tokens by ``token_slots`` [T] (int64; -1: no adapter), once per step."""
        num_tokens = token_slots.shape[0]
        counts = torch.bincount(token_slots + 1, minlength=num_slots + 1).tolist()
        for slot, count in enumerate(counts[1:]):
            if count == num_tokens:
                return LoRAPlan(token_slots.new_empty(0), counts[1:], num_tokens, slot)
        order = torch.argsort(token_slots, stable=True)
        return LoRAPlan(order[counts[0]:], counts[1:], num_tokens, None)

    def apply(self, plan: LoRAPlan, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scales: torch.Tensor) -> None:
        """``y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T * scales[s]`` in place for each token ``t`` with slot
        ``s >= 0``; ``x`` [T, in], ``y`` [T, out], ``lora_a`` [S, R, in], ``lora_b`` [S, out, R], ``scales`` [S]
        (float32). Computed in ``x``'s dtype, added in ``y``'s."""
        if plan.single_slot is not None:
            slot = plan.single_slot
            delta = (x @ lora_a[slot].T) @ lora_b[slot].T
            y += (delta * scales[slot].to(delta.dtype)).to(y.dtype)
            return
        grouped = x[plan.token]
        out = torch.empty((grouped.shape[0], lora_b.shape[1]), dtype=x.dtype, device=x.device)
        start = 0
        for slot, rows in enumerate(plan.counts):  # one shrink/expand pair per slot that has tokens
            if rows == 0:
                continue
            delta = (grouped[start:start + rows] @ lora_a[slot].T) @ lora_b[slot].T
            out[start:start + rows] = delta * scales[slot].to(delta.dtype)
            start += rows
        y.index_add_(0, plan.token, out.to(y.dtype))


class LoRAShrinkExpandAllSlots(OpImpl):
    """Every slot's shrink for every token in one matmul, the rows' own slots kept by a one-hot weight (times the
    slot's scale), and one expand over all slots: two matmuls per layer whatever the number of adapters, at
    ``max_loras`` times the reference's multiply-adds — at rank 16 still small beside the base layer's, while the
    per-slot matmuls' gathers, scatters and calls are what a step pays for. Preferred to the reference: W1 with the
    64 requests over 8 rank-16 adapters (SmolLM2-135M, bf16, Intel Xeon with AMX) took 17.5 s with it against 26.1 s
    (``--op-impl lora_shrink_expand=torch`` picks the reference). The scale multiplies the shrunk values before the
    expand (rounding differs from the reference's by the dtype's steps)."""

    op, name = "lora_shrink_expand", "torch_all_slots"
    priority = 1

    def plan(self, token_slots: torch.Tensor, num_slots: int) -> torch.Tensor:
        """The [T, S] one-hot of each token's slot (a zero row for tokens without an adapter)."""
        has_slot = (token_slots >= 0).unsqueeze(1)
        return torch.nn.functional.one_hot(token_slots.clamp(min=0), num_slots) * has_slot

    def apply(self, plan: torch.Tensor, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scales: torch.Tensor) -> None:
        slots, rank, d_in = lora_a.shape
        tokens = x.shape[0]
        shrunk = (x @ lora_a.reshape(slots * rank, d_in).T).view(tokens, slots, rank)
        weight = (plan * scales).to(x.dtype).unsqueeze(2)  # [T, S, 1]: the token's own slot's scale, else 0
        expand = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], slots * rank)
        y += ((shrunk * weight).view(tokens, slots * rank) @ expand.T).to(y.dtype)


LORA_REFERENCE_IMPLS = [LoRAShrinkExpand, LoRAShrinkExpandAllSlots]
