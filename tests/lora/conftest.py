"""Fixtures for the LoRA tests: PEFT adapters with random non-zero weights on the tiny random models, and greedy
references from transformers + peft."""

from __future__ import annotations

import pytest
import torch


def make_peft_adapter(base, out_dir: str, seed: int, r: int = 8, alpha: int = 16,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      use_rslora: bool = False, std: float = 0.2, **extra) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    """A PEFT adapter with random non-zero A and B (normal, ``std``) on ``base`` (a model directory, or a
    transformers model, which is left as it was), saved to ``out_dir``."""
    import copy

    torch.manual_seed(seed)
    model = (AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str)
             else copy.deepcopy(base))
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  use_rslora=use_rslora, lora_dropout=0.0, **extra))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the model
                p.normal_(0, std)
            elif "lora_A" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base, adapter_dir: str | None, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations (float32, EOS not special) from transformers with the adapter applied by peft
    (unmerged, as peft runs it); ``adapter_dir=None``: the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import copy

    model = (AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str)
             else copy.deepcopy(base))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            tokens = []
            for _ in range(max_tokens):
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            outs.append(tokens)
    return outs


@pytest.fixture(scope="session")
def lora_adapters(tiny_model_dir, tmp_path_factory):
    """``lora_adapters(kind, name, **options)`` → a PEFT adapter directory on the tiny ``kind`` model (built once
    per session and options)."""
    built: dict[tuple, str] = {}

    def make(kind: str, name: str, **options) -> str:
        key = (kind, name, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in built:
            seed = 100 + len(built)
            built[key] = make_peft_adapter(tiny_model_dir(kind), str(tmp_path_factory.mktemp(f"lora_{name}")), seed,
                                           **options)
        return built[key]

    return make
