"""The reference mixture-of-experts ops in plain torch: ``moe_topk`` (a router's choice of experts) and ``fused_moe``
(the MLP over routed tokens).

Tokens are grouped by expert (a stable sort of the flattened expert ids), so each expert that received tokens
runs one pair of matmuls over all of its rows; nothing loops over tokens in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pagoda.ops.interface import OpImpl

#: Activations of the gate half (``act(gate) * up``) the op takes.
MOE_ACTIVATIONS = ("silu",)


def check_moe_activation(activation: str) -> None:
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation!r} is not supported; supported: "
                         f"{', '.join(MOE_ACTIVATIONS)}")


@dataclass
class ExpertWeights:
    w13: torch.Tensor  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor  # [E, H, I]


@dataclass
class RoutedRows:
    """The step's (token, slot) pairs grouped by expert: row ``j`` of the grouped batch is token ``token[j]``."""

    order: torch.Tensor  # [T * k]: flat (token, slot) indices, sorted by expert (stable)
    token: torch.Tensor  # [T * k]: the token of each grouped row
    counts: list[int]  # rows per expert, [E]


def route_rows(topk_ids: torch.Tensor, num_experts: int) -> RoutedRows:
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return RoutedRows(order, order // topk_ids.shape[1], counts)


def mix_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                expert_mlp: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_mlp(topk_ids[t, j], x[t])`` with the rows grouped by expert:
    ``expert_mlp(expert, rows, tokens)`` runs once per expert that has rows (``tokens``: each row's token). The
    weighted sum is taken in float32 and rounded once to ``x``'s dtype."""
    routed = route_rows(topk_ids, num_experts)
    grouped = x[routed.token]
    out = torch.empty_like(grouped)
    start = 0
    for expert, rows in enumerate(routed.counts):
        if rows:
            out[start:start + rows] = expert_mlp(expert, grouped[start:start + rows],
                                                 routed.token[start:start + rows])
            start += rows
    weights = topk_weights.reshape(-1)[routed.order].float()
    summed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    summed.index_add_(0, routed.token, out.float() * weights[:, None])
    return summed.to(x.dtype)


class FusedMoE(OpImpl):
    op, name, is_reference = "fused_moe", "torch", True
    keeps_weight = True

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> ExpertWeights:
        """The implementation's form of the stacked expert weights (made once after loading, on their device):
        ``w13`` [E, 2I, H] (gate rows then up rows per expert) and ``w2`` [E, H, I]."""
        if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[1] != 2 * w2.shape[2] \
                or w13.shape[2] != w2.shape[1]:
            raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} are not [E, 2I, H] and "
                             "[E, H, I]")
        return ExpertWeights(w13, w2)

    def apply(self, handle: ExpertWeights, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu") -> torch.Tensor:
        """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` for ``x`` [T, H], where
        ``expert_e(x) = (act(x W_gate^T) * (x W_up^T)) W_down^T``. Each expert's matmuls run in ``x``'s dtype; the
        weighted sum over a token's experts is taken in float32 and rounded once to ``x``'s dtype."""
        check_moe_activation(activation)

        def expert_mlp(expert: int, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            gate, up = F.linear(rows, handle.w13[expert]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, handle.w2[expert])

        return mix_experts(x, topk_weights, topk_ids, handle.w13.shape[0], expert_mlp)

    def expert_matmul(self, handle: ExpertWeights, expert: int, part: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for one expert's ``part``: "gate_up" (``x`` [T, H] → [T, 2I], gate then up) or "down"
        (``x`` [T, I] → [T, H]), in ``x``'s dtype: what a LoRA adapter on the experts adds its deltas to."""
        return F.linear(x, (handle.w13 if part == "gate_up" else handle.w2)[expert].to(x.dtype))

    def apply_lora(self, handle: ExpertWeights, lora: Any, x: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, activation: str, token_slots: torch.Tensor) -> torch.Tensor | None:
        """:meth:`apply` with LoRA deltas on the experts of the tokens whose slot (``token_slots``, -1: none) has an
        adapter in ``lora`` (:class:`pagoda.lora.experts.ExpertsLoRA`), in one call; None where the implementation
        has no such form (here): the block then runs its adapted tokens expert by expert on :meth:`expert_matmul`."""
        return None

    def nbytes(self, handle: ExpertWeights) -> int:
        return sum(t.numel() * t.element_size() for t in (handle.w13, handle.w2))


class MoeTopK(OpImpl):
    op, name, is_reference = "moe_topk", "torch", True

    def __call__(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [T, E] → (float32 weights [T, k], int64 expert ids [T, k]): the softmax over the experts in
        float32, its ``top_k`` largest entries in descending order, divided by their sum when ``renormalize``."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
