"""``LoRAConfig``: the engine's LoRA settings (vLLM's ``--enable-lora --max-loras --max-lora-rank
--max-cpu-loras``), checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1  # adapter slots on the device: distinct adapters one step may run
    max_lora_rank: int = 16  # slots are padded to this rank; a larger adapter is refused
    max_cpu_loras: int = 1  # adapters kept loaded in host memory (LRU)

    @classmethod
    def from_engine_args(cls, args: Any) -> LoRAConfig:
        """From ``EngineArgs`` fields; a bad value is a ``ValueError`` naming the field."""
        if not isinstance(args.max_loras, int) or args.max_loras < 1:
            raise ValueError(f"max_loras: must be an integer >= 1, got {args.max_loras!r}")
        if not isinstance(args.max_lora_rank, int) or args.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank: must be an integer >= 1, got {args.max_lora_rank!r}")
        max_cpu = args.max_loras if args.max_cpu_loras is None else args.max_cpu_loras
        if not isinstance(max_cpu, int) or max_cpu < args.max_loras:
            raise ValueError(f"max_cpu_loras ({args.max_cpu_loras!r}) must be >= max_loras ({args.max_loras})")
        return cls(args.max_loras, args.max_lora_rank, max_cpu)
