"""bf16 with the platform's fused decode step: steps with adapter rows decline it (it knows nothing of adapters)
and the steps after them get it back; the adapter rows of a mixed batch equal the adapter run on its own, and the
base rows equal the base model run on its own."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43]]


def test_lora_steps_decline_fused_decode_and_agree_with_single_runs(tiny_model_dir, lora_adapters):
    llm = LLM(tiny_model_dir("llama"), dtype="bfloat16", enable_lora=True, max_loras=2, skip_tokenizer_init=True,
              max_model_len=128, num_gpu_blocks_override=64)
    runner = llm.llm_engine.runner
    if runner.fused_decode is None:
        pytest.skip("this platform fuses no decode step for the tiny model in bf16")
    lora = LoRARequest("a", 1, lora_adapters("llama", "a"))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    def tokens(outputs):
        return [list(o.outputs[0].token_ids) for o in outputs]

    mixed = tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=[lora, None, lora]))
    assert runner.model.model.fused_decode is runner.fused_decode  # given back after the LoRA steps
    alone = tokens(llm.generate([prompts[0], prompts[2]], params, use_tqdm=False, lora_request=lora))
    base = tokens(llm.generate([prompts[1]], params, use_tqdm=False))
    assert [mixed[0], mixed[2]] == alone and [mixed[1]] == base
    assert mixed[0] != tokens(llm.generate([prompts[0]], params, use_tqdm=False))[0]  # the adapter does something
    assert_all_blocks_free(llm)
