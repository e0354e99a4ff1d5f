"""The reference ``lora_shrink_expand`` op: many LoRA adapters applied in one batch, in plain torch.

An implementation owns the layout of each layer's adapter slots: ``create_slots`` makes a layer's storage for
``max_loras`` adapters, ``set_slot`` writes one adapter into one slot (after loading, or when the slot is
recycled), ``plan`` groups a step's tokens by slot once per step and ``apply`` adds a layer's delta. The torch
implementations keep the slots as stacked matrices (:class:`StackedLoRASlots`).

The reference does it as punica's SGMV kernels do: the plan is a stable sort of the per-token slot indices, and each
layer's ``apply`` runs one shrink (``x @ A.T``) and one expand (``@ B.T * scale``) per slot that has tokens, adding
the delta into the base layer's output. Python loops only over the (at most ``max_loras``) slots, never over
requests or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops.interface import OpImpl

#: An adapter's matrices for one layer: shard index → (A [r, input_size], B [output_sizes[shard], r]), r at most
#: the slots' max_rank; shards it doesn't adapt are absent.
AdapterShards = dict[int, tuple[torch.Tensor, torch.Tensor]]


class StackedLoRASlots:
    """One layer's slots as stacked matrices. A merged layer (``qkv_proj``: q, k, v) holds its shards' A matrices
    one after another (``lora_a`` [S, shards * R, in]) and their B matrices block-diagonally (``lora_b``
    [S, out, shards * R]), so one shrink/expand pair serves all its shards; each adapter is padded with zeros up
    to ``R = max_rank`` (zeros add exactly nothing)."""

    def __init__(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_rank = max_rank
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        shards = len(output_sizes)
        self.lora_a = torch.zeros(num_slots, shards * max_rank, input_size, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, sum(output_sizes), shards * max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, shards: AdapterShards | None) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for shard, (a, b) in (shards or {}).items():
            rank, base = a.shape[0], shard * self.max_rank
            out = self.offsets[shard]
            self.lora_a[slot, base:base + rank].copy_(a)
            self.lora_b[slot, out:out + b.shape[0], base:base + rank].copy_(b)

    def nbytes(self) -> int:
        return (self.lora_a.numel() + self.lora_b.numel()) * self.lora_a.element_size()


class StackedSlotsImpl(OpImpl):
    """The slot storage of the torch implementations."""

    op = "lora_shrink_expand"

    def create_slots(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int],
                     dtype: torch.dtype, device: torch.device) -> StackedLoRASlots:
        """A layer's storage for ``num_slots`` adapters of rank up to ``max_rank``, every slot empty (zeros)."""
        return StackedLoRASlots(num_slots, max_rank, input_size, output_sizes, dtype, device)

    def set_slot(self, slots: StackedLoRASlots, slot: int, shards: AdapterShards | None) -> None:
        """Write an adapter's matrices for this layer into ``slot`` (``None``: empty it)."""
        slots.set_slot(slot, shards)

    def slots_nbytes(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int],
                     dtype: torch.dtype) -> int:
        """What ``create_slots`` with these arguments will allocate on the device (for the memory budget)."""
        shards = len(output_sizes)
        elements = num_slots * shards * max_rank * (input_size + sum(output_sizes))
        return elements * torch.empty(0, dtype=dtype).element_size()


@dataclass
class LoRAPlan:
    """A step's tokens grouped by slot: grouped row ``j`` is token ``token[j]``; ``counts[s]`` rows per slot."""

    token: torch.Tensor  # [N]: tokens that have an adapter, sorted by slot (stable)
    counts: list[int]  # [num_slots]
    num_tokens: int
    single_slot: int | None  # every token in this one slot: no gather or scatter needed


class LoRAShrinkExpand(StackedSlotsImpl):
    name, is_reference = "torch", True

    def plan(self, token_slots: torch.Tensor, num_slots: int) -> LoRAPlan:
        """Group a step's tokens by ``token_slots`` [T] (int64; -1: no adapter), once per step."""
        num_tokens = token_slots.shape[0]
        counts = torch.bincount(token_slots + 1, minlength=num_slots + 1).tolist()
        for slot, count in enumerate(counts[1:]):
            if count == num_tokens:
                return LoRAPlan(token_slots.new_empty(0), counts[1:], num_tokens, slot)
        order = torch.argsort(token_slots, stable=True)
        return LoRAPlan(order[counts[0]:], counts[1:], num_tokens, None)

    def apply(self, plan: LoRAPlan, y: torch.Tensor, x: torch.Tensor, slots: StackedLoRASlots,
              scales: torch.Tensor) -> None:
        """``y[t] += (x[t] @ A[s].T) @ B[s].T * scales[s]`` in place for each token ``t`` with slot ``s >= 0``;
        ``x`` [T, in], ``y`` [T, out], ``scales`` [S] (float32). Computed in ``x``'s dtype, added in ``y``'s."""
        lora_a, lora_b = slots.lora_a, slots.lora_b
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


class LoRAShrinkExpandAllSlots(StackedSlotsImpl):
    """Every slot's shrink for every token in one matmul, the rows' own slots kept by a one-hot weight (times the
    slot's scale), and one expand over all slots: two matmuls per layer whatever the number of adapters, at
    ``max_loras`` times the reference's multiply-adds — at rank 16 still small beside the base layer's, while the
    per-slot matmuls' gathers, scatters and calls are what a step pays for. Preferred to the reference where no
    native implementation runs: W1 with the 64 requests over 8 rank-16 adapters (SmolLM2-135M, bf16, Intel Xeon
    with AMX) took 17.5 s with it against 26.1 s (``--op-impl lora_shrink_expand=torch`` picks the reference).
    The scale multiplies the shrunk values before the expand (rounding differs from the reference's by the
    dtype's steps)."""

    name = "torch_all_slots"
    priority = 1

    def plan(self, token_slots: torch.Tensor, num_slots: int) -> torch.Tensor:
        """The [T, S] one-hot of each token's slot (a zero row for tokens without an adapter)."""
        has_slot = (token_slots >= 0).unsqueeze(1)
        return torch.nn.functional.one_hot(token_slots.clamp(min=0), num_slots) * has_slot

    def apply(self, plan: torch.Tensor, y: torch.Tensor, x: torch.Tensor, slots: StackedLoRASlots,
              scales: torch.Tensor) -> None:
        lora_a, lora_b = slots.lora_a, slots.lora_b
        num_slots, rank, d_in = lora_a.shape
        tokens = x.shape[0]
        shrunk = (x @ lora_a.reshape(num_slots * rank, d_in).T).view(tokens, num_slots, rank)
        weight = (plan * scales).to(x.dtype).unsqueeze(2)  # [T, S, 1]: the token's own slot's scale, else 0
        expand = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_slots * rank)
        y += ((shrunk * weight).view(tokens, num_slots * rank) @ expand.T).to(y.dtype)


LORA_REFERENCE_IMPLS = [LoRAShrinkExpand, LoRAShrinkExpandAllSlots]
