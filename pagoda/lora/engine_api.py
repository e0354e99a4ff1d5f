"""The LoRA half of ``LLMEngine``'s API (vLLM's ``add_lora`` / ``remove_lora`` / ``list_loras`` / ``pin_lora``),
mixed into the engine; the adapters themselves live in the model runner's ``LoRAManager``."""

from __future__ import annotations

from typing import Any

from pagoda.lora.request import LoRARequest


class LoRAEngineMixin:
    runner: Any

    def _runner_lora(self) -> Any:
        runner = self.runner  # None with worker processes, which refuse enable_lora
        return runner.lora if runner is not None else None

    def _lora_manager(self, what: str) -> Any:
        manager = self._runner_lora()
        if manager is None:
            raise ValueError(f"{what}: LoRA is not enabled; start the engine with enable_lora=True (--enable-lora)")
        return manager

    def check_lora_request(self, lora_request: Any) -> LoRARequest | None:
        """Validate a request's adapter and load it into host memory if it isn't there (errors name the problem)."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request: must be a LoRARequest, got {type(lora_request).__name__}")
        if self._runner_lora() is None:
            raise ValueError(f"Got lora_request {lora_request} but LoRA is not enabled! Start the engine with "
                             "enable_lora=True (--enable-lora)")
        self.runner.lora.add(lora_request)
        return lora_request

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into host memory, checked against the model (a ``ValueError`` names any problem)."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request: must be a LoRARequest, got {type(lora_request).__name__}")
        return self._lora_manager("add_lora").add(lora_request) or lora_request.lora_int_id in self.list_loras()

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter from host memory and its slot; False if it wasn't loaded. Requests still running with
        it read it again from its path."""
        return self._lora_manager("remove_lora").remove(lora_int_id)

    def list_loras(self) -> set[int]:
        return self._lora_manager("list_loras").list()

    def pin_lora(self, lora_int_id: int) -> bool:
        """Keep an adapter in host memory whatever ``max_cpu_loras`` says."""
        return self._lora_manager("pin_lora").pin(lora_int_id)
