"""Multi-LoRA serving: adapters (PEFT directories) applied per request beside the base model's weights."""
