"""The scheduler's LoRA rule: a step never needs more than ``max_loras`` distinct adapters (the slots on the
device), so a waiting request whose adapter would be one too many is passed over this step (it keeps its place in
the queue) while requests of adapters already running, or of the base model, go ahead."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LoRAAdmission:
    """One step's count of the adapters running; built only when a waiting request has an adapter."""

    def __init__(self, max_loras: int, running: Iterable[Any]) -> None:
        self.max_loras = max_loras
        self.active = {r.lora_request.lora_int_id for r in running if r.lora_request is not None}

    def fits(self, request: Any) -> bool:
        lora_id = request.lora_request.lora_int_id
        return lora_id in self.active or len(self.active) < self.max_loras

    def admitted(self, request: Any) -> None:
        if request.lora_request is not None:
            self.active.add(request.lora_request.lora_int_id)
