"""Adapter slots on the device, per layer: what a ``Linear`` adds its LoRA delta from (a routed-experts block's:
:mod:`pagoda.lora.experts`).

The slots' layout belongs to the ``lora_shrink_expand`` implementation (stacked matrices for torch, packed tiles
for a native kernel): each layer asks the op for its storage and writes adapters through it.
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.lora.experts import ExpertsLoRA, experts_slots_nbytes
from pagoda.lora.peft_experts import ExpertsShape

#: pagoda's layers an adapter may target (the merged projections and the single ones of Llama-style models).
LORA_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAStep:
    """What every layer's slots share for the current step: the op's plan (None: no row of this step has an
    adapter, and no layer does any LoRA work) and the per-slot scales."""

    def __init__(self, op: Any, num_slots: int, device: torch.device) -> None:
        self.op = op
        self.plan: Any = None
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        # Each token's slot (-1: none) while plan is set; and whether a row's adapter adapts routed experts (when
        # none does, the experts blocks skip their per-token slot lookup).
        self.token_slots: torch.Tensor | None = None
        self.experts_active = False


class LinearLoRA:
    """One ``Linear``'s adapter slots (a plain object, not a module: slots are not checkpoint parameters)."""

    def __init__(self, step: LoRAStep, input_size: int, output_sizes: list[int], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.step = step
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.slots = step.op.create_slots(num_slots, max_rank, input_size, self.output_sizes, dtype, device)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.step
        # Models run on one flat token batch: x and y are [T, features], added into in place.
        rows_y = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        rows_x = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        step.op.apply(step.plan, rows_y, rows_x, self.slots, step.scales)

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Write an adapter's matrices for this layer into ``slot`` (zeros where it doesn't adapt a shard)."""
        self.step.op.set_slot(self.slots, slot, shards)


def _lora_linears(model: torch.nn.Module) -> list[Any]:
    """The ``Linear`` layers of ``model`` adapters may target."""
    from pagoda.models.layers import Linear

    return [module for module in model.modules()
            if isinstance(module, Linear) and module.prefix.rpartition(".")[2] in LORA_LAYER_NAMES]


def _lora_experts(model: torch.nn.Module) -> list[Any]:
    """The routed-experts blocks of ``model`` (their ``fused_moe`` op can give their weights back)."""
    from pagoda.models.moe_layers import FusedExperts

    return [module for module in model.modules() if isinstance(module, FusedExperts)]


def lora_slots_nbytes(model: torch.nn.Module, op: Any, num_slots: int, max_rank: int, dtype: torch.dtype) -> int:
    """What :func:`attach_lora` will allocate on the device for ``model``'s adapter slots."""
    linears = sum(op.slots_nbytes(num_slots, max_rank, m.input_size, m.output_sizes, dtype)
                  for m in _lora_linears(model))
    experts = sum(experts_slots_nbytes(num_slots, m.num_experts, m.hidden_size, m.intermediate_size, max_rank, dtype)
                  for m in _lora_experts(model))
    return linears + experts


def attach_lora(model: torch.nn.Module, step: LoRAStep, num_slots: int, max_rank: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, LinearLoRA]:
    """Give every LoRA-capable ``Linear`` of ``model`` its slots, and every routed-experts block its own; returns
    layer name (the ``Linear``'s prefix, as the checkpoint names it) → slots (the blocks: :func:`experts_lora`)."""
    layers = {}
    for module in _lora_linears(model):
        module.lora = LinearLoRA(step, module.input_size, module.output_sizes, num_slots, max_rank, dtype, device)
        layers[module.prefix] = module.lora
    for module in _lora_experts(model):
        module.lora = ExpertsLoRA(step, module.num_experts, module.hidden_size, module.intermediate_size, num_slots,
                                  max_rank, device, dtype)
    if not layers:
        raise ValueError(f"enable_lora: the model ({type(model).__name__}) has no layer LoRA adapters can target "
                         f"({', '.join(LORA_LAYER_NAMES)})")
    return layers


def experts_lora(model: torch.nn.Module) -> dict[str, tuple[ExpertsLoRA, ExpertsShape]]:
    """The routed-experts blocks :func:`attach_lora` gave slots: module path → (slots, shape)."""
    return {module.prefix: (module.lora, ExpertsShape(module.num_experts, module.hidden_size,
                                                      module.intermediate_size))
            for module in _lora_experts(model) if module.lora is not None}
