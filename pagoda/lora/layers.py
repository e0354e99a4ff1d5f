"""Adapter slots on the device, per layer: the stacked A/B matrices a ``Linear`` adds its LoRA delta from.

A merged layer (``qkv_proj``: q, k, v) holds its shards' A matrices one after another (``[S, shards * R, in]``) and
their B matrices block-diagonally (``[S, out, shards * R]``), so one shrink/expand pair serves all its shards; each
adapter is padded with zeros up to ``max_lora_rank`` (zeros add exactly nothing).
"""

from __future__ import annotations

from typing import Any

import torch

#: pagoda's layers an adapter may target (the merged projections and the single ones of Llama-style models).
LORA_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAStep:
    """What every layer's slots share for the current step: the op's plan (None: no row of this step has an
    adapter, and no layer does any LoRA work) and the per-slot scales."""

    def __init__(self, op: Any, num_slots: int, device: torch.device) -> None:
        self.op = op
        self.plan: Any = None
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)


class LinearLoRA:
    """One ``Linear``'s adapter slots (a plain object, not a module: slots are not checkpoint parameters)."""

    def __init__(self, step: LoRAStep, input_size: int, output_sizes: list[int], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.step = step
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.max_rank = max_rank
        shards = len(output_sizes)
        self.lora_a = torch.zeros(num_slots, shards * max_rank, input_size, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, sum(output_sizes), shards * max_rank, dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.step
        # Models run on one flat token batch: x and y are [T, features], added into in place.
        rows_y = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        rows_x = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        step.op.apply(step.plan, rows_y, rows_x, self.lora_a, self.lora_b, step.scales)

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Write an adapter's matrices for this layer into ``slot`` (zeros where it doesn't adapt a shard)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for shard, (a, b) in (shards or {}).items():
            rank, base = a.shape[0], shard * self.max_rank
            out = self.offsets[shard]
            self.lora_a[slot, base:base + rank].copy_(a)
            self.lora_b[slot, out:out + b.shape[0], base:base + rank].copy_(b)


def attach_lora(model: torch.nn.Module, step: LoRAStep, num_slots: int, max_rank: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, LinearLoRA]:
    """Give every LoRA-capable ``Linear`` of ``model`` its slots; returns layer name (the ``Linear``'s prefix, as
    the checkpoint names it) → slots."""
    from pagoda.models.layers import Linear

    layers = {}
    for module in model.modules():
        if isinstance(module, Linear) and module.prefix.rpartition(".")[2] in LORA_LAYER_NAMES:
            module.lora = LinearLoRA(step, module.input_size, module.output_sizes, num_slots, max_rank, dtype,
                                     device)
            layers[module.prefix] = module.lora
    if not layers:
        raise ValueError(f"enable_lora: the model ({type(model).__name__}) has no layer LoRA adapters can target "
                         f"({', '.join(LORA_LAYER_NAMES)})")
    return layers
