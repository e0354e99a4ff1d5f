"""The example plugin driving the whole engine: platform ``example``, backend ``EXAMPLE_ATTN`` and
``example_int8`` weights quantized at load, against transformers running the same int8-rounded weights."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.plugins.registry import reset_registry

MAX_TOKENS = 8


@pytest.fixture
def plugin_registry(with_plugins, monkeypatch):
    monkeypatch.setenv("PAGODA_EXAMPLE_PRIORITY", "50")  # make the example platform win --device auto
    reset_registry()
    yield
    reset_registry()  # later tests get a registry without the example plugins


def _rounded_hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuations with every linear weight replaced by its int8 round trip."""
    from pagoda_example_accelerator.quantization import quantize_per_channel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                q, scale = quantize_per_channel(module.weight)
                module.weight.copy_(q.float() * scale[:, None])
        outs = []
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(prompt):])
    return outs


def test_example_platform_backend_and_int8_end_to_end(plugin_registry, tiny_model_dir):
    path = tiny_model_dir("llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (4, 13, 21)]
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22, seed=0,
              quantization="example_int8", max_num_batched_tokens=16)
    config = llm.llm_engine.config
    assert (config.platform.name, config.attention_backend.name) == ("example", "EXAMPLE_ATTN")
    model = llm.llm_engine.runner.model
    int8 = [name for name, buf in model.named_buffers() if name.endswith("qweight") and buf.dtype == torch.int8]
    assert len(int8) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
    assert not any(name.endswith("proj.weight") for name, _ in model.named_parameters())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _rounded_hf_greedy(path, prompts)
