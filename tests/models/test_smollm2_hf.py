"""The real SmolLM2-135M-Instruct weights in Hugging Face format: greedy equality with transformers."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free, hf_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colors:"]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_hf_dir):
    llm = LLM(smollm2_hf_dir, dtype="float32", kv_cache_memory_bytes=1 << 27, max_num_batched_tokens=16)
    tokenizer = llm.get_tokenizer()
    token_prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(smollm2_hf_dir, token_prompts, 32)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert outputs[0].outputs[0].text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert_all_blocks_free(llm)


@pytest.mark.slow
def test_smollm2_chat_answers_paris(smollm2_hf_dir):
    llm = LLM(smollm2_hf_dir, kv_cache_memory_bytes=1 << 27)  # dtype auto: bfloat16 where the CPU has it
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
