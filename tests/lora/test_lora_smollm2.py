"""A PEFT adapter on the real SmolLM2-135M-Instruct weights (the HF-format copy): greedy equality with
transformers + peft in float32, the adapter's rows batched with base-model rows."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free
from tests.lora.conftest import make_peft_adapter, peft_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.mark.slow
def test_smollm2_adapter_matches_peft(smollm2_hf_dir, tmp_path):
    adapter = make_peft_adapter(smollm2_hf_dir, str(tmp_path / "adapter"), seed=3, r=8, alpha=8,
                                target_modules=("q_proj", "v_proj", "down_proj"))
    llm = LLM(smollm2_hf_dir, dtype="float32", kv_cache_memory_bytes=1 << 27, enable_lora=True, max_loras=1)
    tokenizer = llm.get_tokenizer()
    token_prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    lora = LoRARequest("smol", 1, adapter)
    outputs = llm.generate(PROMPTS * 2, params, use_tqdm=False, lora_request=[lora, lora, None, None])
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got[:2] == peft_greedy(smollm2_hf_dir, adapter, token_prompts, 8)
    assert got[2:] == peft_greedy(smollm2_hf_dir, None, token_prompts, 8)
    assert got[:2] != got[2:]
    assert_all_blocks_free(llm)
