"""Adapter slots of a mixture-of-experts block's routed experts, and the block's forward for the rows whose adapter
adapts them.

The ``fused_moe`` op runs those rows in its own mixture where it has such a form (``apply_lora``: the CPU's native
kernel); else they run expert by expert: each expert's gate-up and down products (the op's ``expert_matmul``, on its
prepared weights) plus every slot's low-rank deltas in torch, added before the activation and after the down
product, while the other rows keep the op. The slots are in the model's dtype for bf16 models (as the linears' and
vLLM's are; half the memory of float32) and float32 otherwise; either way the deltas are computed in float32 and
added with one rounding, as the CPU's native ``lora_shrink_expand`` adds its own. The gate-up rank of a slot is twice
``max_lora_rank`` (PEFT fuses gate and up into one adapter of twice the rank), the down rank ``max_lora_rank``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from pagoda.lora.peft_experts import ExpertsAdapter
from pagoda.ops.reference_moe import mix_experts


def slot_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The experts' slots' dtype for a model of ``model_dtype``: bf16 for bf16 models, else float32."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


class ExpertsLoRA:
    """One experts block's slots: ``a13`` [S, E, 2R, H], ``bt13`` [S, E, 2R, 2I], ``a2`` [S, E, R, I], ``bt2``
    [S, E, R, H] (R = ``max_rank``; :func:`slot_dtype`; each ``B`` transposed, rank-major, holding its scaling);
    ``adapted[s]``: whether slot ``s``'s adapter adapts this block, also as the uint8 tensor ``adapted_mask`` [S + 1]
    (the native kernel reads it; its last entry, always 0, is what slot -1 indexes)."""

    def __init__(self, step: Any, num_experts: int, hidden: int, intermediate: int, num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.step = step
        shapes = experts_slot_shapes(num_slots, num_experts, hidden, intermediate, max_rank)
        kind = slot_dtype(dtype)
        self.a13, self.bt13, self.a2, self.bt2 = (torch.zeros(s, dtype=kind, device=device) for s in shapes)
        self.adapted = [False] * num_slots
        self.adapted_mask = torch.zeros(num_slots + 1, dtype=torch.uint8, device=device)

    def set_slot(self, slot: int, adapter: ExpertsAdapter | None) -> None:
        for t in (self.a13, self.bt13, self.a2, self.bt2):
            t[slot].zero_()
        self.adapted[slot] = adapter is not None
        self.adapted_mask[slot] = int(adapter is not None)
        if adapter is None:
            return
        if adapter.a13 is not None:
            rank = adapter.a13.shape[1]
            self.a13[slot, :, :rank].copy_(adapter.a13)
            self.bt13[slot, :, :rank].copy_(adapter.b13.transpose(1, 2))
        if adapter.a2 is not None:
            rank = adapter.a2.shape[1]
            self.a2[slot, :, :rank].copy_(adapter.a2)
            self.bt2[slot, :, :rank].copy_(adapter.b2.transpose(1, 2))

    def rows(self) -> torch.Tensor | None:
        """This step's per-token slot where the token's adapter adapts this block, else -1; None when no token's
        does."""
        slots = self.step.token_slots
        if slots is None or not self.step.experts_active or not any(self.adapted):
            return None
        mine = torch.where(self.adapted_mask[slots].bool(), slots, -1)  # slot -1 indexes the mask's last 0
        return mine if bool((mine >= 0).any()) else None

    def forward(self, op: Any, handle: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                activation: str, token_slots: torch.Tensor) -> torch.Tensor:
        """The block's output: the op's own mixture with these slots' deltas where it has one (``apply_lora``), else
        ``op`` for the tokens without an adapted slot (``token_slots`` -1) and expert by expert with the slots'
        deltas for the others."""
        out = op.apply_lora(handle, self, x, topk_weights, topk_ids, activation, token_slots)
        if out is not None:
            return out
        out = torch.empty_like(x)
        adapted = token_slots >= 0
        plain = (~adapted).nonzero().squeeze(-1)
        if plain.numel():
            out[plain] = op.apply(handle, x[plain], topk_weights[plain], topk_ids[plain], activation)
        rows = adapted.nonzero().squeeze(-1)
        slots = token_slots[rows]
        present = slots.unique().tolist()
        out[rows] = self._adapted(op, handle, x[rows], topk_weights[rows], topk_ids[rows],
                                  None if len(present) == 1 else slots, present)
        return out

    def _adapted(self, op: Any, handle: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 slots: torch.Tensor | None, present: list[int]) -> torch.Tensor:
        """As the reference ``fused_moe`` (``mix_experts``), with the deltas of the slots ``present`` (``slots``:
        each token's, None when all tokens have the one slot present)."""

        def expert_mlp(expert: int, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            these = slots[tokens] if slots is not None else None
            h = op.expert_matmul(handle, expert, "gate_up", rows)
            h = self._with_delta(h, rows, these, present, self.a13[:, expert], self.bt13[:, expert])
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
            y = op.expert_matmul(handle, expert, "down", act)
            return self._with_delta(y, act, these, present, self.a2[:, expert], self.bt2[:, expert])

        return mix_experts(x, topk_weights, topk_ids, self.a13.shape[1], expert_mlp)

    @staticmethod
    def _with_delta(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor | None, present: list[int],
                    a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        """``y + (x a[s]^T) bt[s]`` for each row's slot ``s``, in float32, rounded once to ``y``'s dtype."""
        x32, total = x.float(), y.float()
        if slots is None:
            return (total + F.linear(x32, a[present[0]].float()) @ bt[present[0]].float()).to(y.dtype)
        for slot in present:
            pick = (slots == slot).nonzero().squeeze(-1)
            if pick.numel():
                total[pick] += F.linear(x32[pick], a[slot].float()) @ bt[slot].float()
        return total.to(y.dtype)


def experts_slot_shapes(num_slots: int, num_experts: int, hidden: int, intermediate: int,
                        max_rank: int) -> list[tuple[int, ...]]:
    """The four slot tensors' shapes (``a13``, ``bt13``, ``a2``, ``bt2``)."""
    s, e, r = num_slots, num_experts, max_rank
    return [(s, e, 2 * r, hidden), (s, e, 2 * r, 2 * intermediate), (s, e, r, intermediate), (s, e, r, hidden)]


def experts_slots_nbytes(num_slots: int, num_experts: int, hidden: int, intermediate: int, max_rank: int,
                         dtype: torch.dtype) -> int:
    """What :class:`ExpertsLoRA` with these arguments (``dtype``: the model's) allocates: slots and ``adapted_mask``."""
    shapes = experts_slot_shapes(num_slots, num_experts, hidden, intermediate, max_rank)
    return sum(math.prod(shape) for shape in shapes) * slot_dtype(dtype).itemsize + num_slots + 1
