"""Greedy output equals transformers' token for token, whatever the batch looks like.

Each engine configuration below changes how requests are batched — alone, mixed together, cut into prefill
chunks by a tiny token budget, hitting the prefix cache, or preempted by a tiny KV cache — and every request's
tokens must still equal transformers' greedy continuation of that prompt alone.
"""

from __future__ import annotations

import random

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_KINDS, assert_all_blocks_free, hf_greedy

MAX_TOKENS = 24

# name → engine arguments that force a batch shape
BATCH_SHAPES = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 7, "max_num_seqs": 4},
    "tiny_kv_cache_preemption": {"num_gpu_blocks_override": 9, "block_size": 8},
    "no_prefix_cache_small_blocks": {"enable_prefix_caching": False, "block_size": 4},
}


def _prompts(seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(33)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 40)]
    # A repeated prefix: the second and third hit the prefix cache of the first.
    prompts += [shared + [5, 6], shared + [7], shared]
    return prompts


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    cache = {}

    def get(kind: str) -> tuple[str, list[list[int]], list[list[int]]]:
        if kind not in cache:
            path = tiny_model_dir(kind)
            prompts = _prompts(hash(kind) % 1000)
            cache[kind] = (path, prompts, hf_greedy(path, prompts, MAX_TOKENS))
        return cache[kind]

    return get


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_matches_transformers(kind, shape, references):
    path, prompts, expected = references(kind)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0,
              **BATCH_SHAPES[shape])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == expected
    assert_all_blocks_free(llm)
    # Alone: the same tokens as in the batch (no request depends on its neighbours).
    alone = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts[:3]]
    assert alone == expected[:3]
    assert_all_blocks_free(llm)
    stats = llm.llm_engine.get_stats()
    if shape == "tiny_kv_cache_preemption":
        assert stats.num_preemptions_total > 0, "the tiny cache was meant to force preemption"


def test_prefix_cache_is_hit(tiny_model_dir, references):
    path, prompts, expected = references("llama")
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    first = llm.generate({"prompt_token_ids": prompts[-3]}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompts[-2]}, params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32  # four full blocks of the shared 33-token prefix
    assert second.outputs[0].token_ids == expected[-2]
    assert_all_blocks_free(llm)


def test_chunked_prefill_of_a_long_prompt(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    rng = random.Random(7)
    prompt = [rng.randrange(3, 1000) for _ in range(300)]
    expected = hf_greedy(path, [prompt], 8)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24,
              max_num_batched_tokens=64)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected[0]
    assert_all_blocks_free(llm)
