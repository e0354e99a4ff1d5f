"""``LLMEngine.warm_up`` (the server runs it before accepting requests) leaves no trace: no request, no used or
cached block, no counted tokens, and the next request's output is transformers' own."""

from __future__ import annotations

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free, hf_greedy


def test_warm_up_leaves_the_engine_as_it_found_it(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = LLM(model_dir, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, block_size=8,
              enable_prefix_caching=True)
    engine = llm.llm_engine
    engine.warm_up(prompt_len=24)  # three full blocks of 8: two of them would be prefix-cache hits
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(llm)
    stats = engine.get_stats()
    assert stats.prompt_tokens_total == 0 and stats.generation_tokens_total == 0

    vocab = engine.model_config.vocab_size
    warm_up_prompt = [1 + i % (vocab - 1) for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (output,) = llm.generate([{"prompt_token_ids": warm_up_prompt}], params, use_tqdm=False)
    assert output.num_cached_tokens == 0  # the warm-up's blocks were not left in the prefix cache
    assert output.outputs[0].token_ids == hf_greedy(model_dir, [warm_up_prompt], 6)[0]
    assert engine.get_stats().prompt_tokens_total == 24
