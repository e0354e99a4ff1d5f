"""The CPU platform's ``lora_shrink_expand``: pagoda's native multi-LoRA kernel (``kernels/csrc/cpu_lora.h``).

Tokens are grouped by slot once per step, and each layer's delta is one packed-bf16 shrink per group of rows of one
slot and one expand per shard, with the B matrices of merged layers kept per shard (no block-diagonal zeros). The
same slots feed the fused decode step (:mod:`pagoda.platforms.cpu.fused_decode`), so decode steps with adapter
rows stay one native call. The numbers: the shrink is scaled and rounded to bf16 once, the expand accumulates in
float32 and is added to the layer's output with one rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.platforms.cpu.kernels import cpu_lora
from pagoda.platforms.cpu.ops import AmxTiles, _NativeBf16Gemm


class NativeLoRAShrinkExpand(_NativeBf16Gemm):
    op, name = "lora_shrink_expand", "cpu_avx512_bf16"
    uses_amx = False

    def create_slots(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int],
                     dtype: torch.dtype, device: torch.device) -> cpu_lora.PackedLoRASlots:
        if dtype != torch.bfloat16:
            raise TypeError(f"lora_shrink_expand {self.name}: bfloat16 slots only, not {dtype}")
        return cpu_lora.PackedLoRASlots(num_slots, max_rank, input_size, output_sizes)

    def set_slot(self, slots: cpu_lora.PackedLoRASlots, slot: int, shards: Any) -> None:
        slots.set_slot(slot, shards)

    def slots_nbytes(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int],
                     dtype: torch.dtype) -> int:
        return cpu_lora.packed_slots_nbytes(num_slots, max_rank, input_size, output_sizes)

    def plan(self, token_slots: torch.Tensor, num_slots: int) -> cpu_lora.LoRAGroups:
        return cpu_lora.LoRAGroups(token_slots, num_slots)

    def apply(self, plan: cpu_lora.LoRAGroups, y: torch.Tensor, x: torch.Tensor, slots: cpu_lora.PackedLoRASlots,
              scales: torch.Tensor) -> None:
        cpu_lora.lora_shrink_expand(plan, y, x, slots, scales, amx=self.uses_amx)


class AmxLoRAShrinkExpand(AmxTiles, NativeLoRAShrinkExpand):
    """The same slots, with the shrink of 8 rows and more of a slot on AMX tiles (prefill chunks)."""


CPU_LORA_OP_IMPLS = [NativeLoRAShrinkExpand, AmxLoRAShrinkExpand]
