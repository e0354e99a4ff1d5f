"""The user's handle on an adapter, as vLLM's ``vllm.lora.request.LoRARequest``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRARequest:
    """A LoRA adapter to apply to a request: ``lora_name`` (how the server's ``model`` field names it),
    ``lora_int_id`` (a positive integer identifying the adapter in the engine — requests with the same id share its
    slot and its prefix-cache entries) and ``lora_path`` (a PEFT directory: ``adapter_config.json`` and
    ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_int_id == other.lora_int_id

    def __hash__(self) -> int:
        return hash(self.lora_int_id)
