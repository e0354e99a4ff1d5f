"""Speculative decoding: greedy output is exactly the output without speculation, whatever the batch looks like
(batched, chunked prefill, preemption, prefix-cache hits), with n-gram and draft-model proposals; stop
conditions apply per accepted token; KV blocks all come back; bad configs are errors naming the key."""

from __future__ import annotations

import random

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free

MAX_TOKENS = 32
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}

# name → engine arguments that force a batch shape
BATCH_SHAPES = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 9, "max_num_seqs": 4},
    "tiny_kv_cache_preemption": {"num_gpu_blocks_override": 14, "block_size": 8},
    "small_blocks_no_prefix_cache": {"enable_prefix_caching": False, "block_size": 4},
}


def _prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so n-gram lookup finds drafts), plus a shared prefix for cache hits."""
    rng = random.Random(seed)
    prompts = []
    for n in (4, 13, 30):
        passage = [rng.randrange(3, 1000) for _ in range(n)]
        prompts.append(passage + passage[: n // 2 + 1])
    shared = [rng.randrange(3, 1000) for _ in range(33)]
    prompts += [shared + shared[:5], shared + [7], [9]]
    return prompts


def _generate(llm: LLM, prompts, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _llm(path: str, speculative_config=None, **kwargs) -> LLM:
    return LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0,
               speculative_config=speculative_config, **kwargs)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(target):
    """Greedy outputs without speculation (which test_greedy_equality checks against transformers)."""
    llm = _llm(target)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    return _generate(llm, _prompts(), params)


def _check_identical(llm: LLM, expected: list[list[int]]) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    prompts = _prompts()
    assert _generate(llm, prompts, params) == expected
    assert_all_blocks_free(llm)
    # Alone, then again: the second run hits the prefix cache of the first.
    assert _generate(llm, [prompts[2]], params) == [expected[2]]
    assert _generate(llm, [prompts[2]], params) == [expected[2]]
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_ngram_greedy_identical(target, reference, shape):
    llm = _llm(target, NGRAM, **BATCH_SHAPES[shape])
    _check_identical(llm, reference)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decoding.num_drafts > 0 and stats.spec_decoding.num_accepted_tokens > 0
    if shape == "tiny_kv_cache_preemption":
        assert stats.num_preemptions_total > 0, "the tiny cache was meant to force preemption"


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_draft_model_is_target_accepts_everything(target, reference, shape):
    """The target as its own draft: every draft is accepted, and the output is unchanged."""
    llm = _llm(target, {"model": target, "num_speculative_tokens": 4}, **BATCH_SHAPES[shape])
    _check_identical(llm, reference)
    spec = llm.llm_engine.get_stats().spec_decoding
    assert spec.num_draft_tokens > 0
    if shape != "tiny_kv_cache_preemption":  # a preempted request's drafts are proposed again, still exact
        assert spec.num_accepted_tokens == spec.num_draft_tokens
        assert spec.mean_acceptance_length > 3


@pytest.fixture(scope="module")
def near_draft(target, tmp_path_factory):
    """The target with noise on its weights: a draft that is often, not always, right."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("near_draft")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_draft_model_greedy_identical(near_draft, target, reference, shape):
    llm = _llm(target, {"method": "draft_model", "model": near_draft, "num_speculative_tokens": 3},
               **BATCH_SHAPES[shape])
    _check_identical(llm, reference)
    spec = llm.llm_engine.get_stats().spec_decoding
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens  # some rejections, some acceptances


def test_unrelated_draft_architecture(tiny_model_dir, target, reference):
    draft = tiny_model_dir("qwen2")  # another architecture with the same 1024-token vocabulary: rarely right
    llm = _llm(target, {"method": "draft_model", "model": draft, "num_speculative_tokens": 3},
               **BATCH_SHAPES["small_blocks_no_prefix_cache"])
    _check_identical(llm, reference)


@pytest.mark.parametrize("config", [NGRAM, "self"])
def test_stops_apply_per_accepted_token(target, reference, config):
    """A stop token, EOS or max_tokens inside an accepted run ends the output there, as without speculation."""
    spec = {"model": target, "num_speculative_tokens": 4} if config == "self" else config
    plain, fast = _llm(target), _llm(target, spec)
    prompts = _prompts()
    stop_token = reference[2][9]  # the 10th output token of the third prompt
    assert stop_token not in reference[2][:9]
    for params in (SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token],
                                  detokenize=False),
                   SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, detokenize=False),
                   SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=12, stop_token_ids=[stop_token],
                                  detokenize=False)):
        expected = plain.llm_engine, _generate(plain, prompts, params)
        got = _generate(fast, prompts, params)
        assert got == expected[1]
    assert len(_generate(fast, prompts[2:3], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                             stop_token_ids=[stop_token]))[0]) == 10
    assert_all_blocks_free(fast)


def test_penalties_and_sampling_mix_in_one_batch(target):
    """Greedy with penalties (each verified row sees the drafts before it as outputs), seeded sampling and
    logprob requests (no drafts) batched together: greedy outputs equal plain decoding's, and seeded sampling
    is reproducible."""
    plain, fast = _llm(target), _llm(target, {"model": target, "num_speculative_tokens": 3})
    prompts = _prompts()[:3]
    penalized = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5, detokenize=False)
    assert _generate(fast, prompts, penalized) == _generate(plain, prompts, penalized)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=24, ignore_eos=True, detokenize=False)
    with_logprobs = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, detokenize=False)
    first = fast.generate([{"prompt_token_ids": p} for p in prompts], [sampled, with_logprobs, penalized],
                          use_tqdm=False)
    second = fast.generate([{"prompt_token_ids": p} for p in prompts], [sampled, with_logprobs, penalized],
                           use_tqdm=False)
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    assert len(first[1].outputs[0].logprobs) == 24
    assert first[1].outputs[0].token_ids == _generate(plain, prompts[1:2], with_logprobs)[0]
    assert first[2].outputs[0].token_ids == _generate(plain, prompts[2:3], penalized)[0]
    assert_all_blocks_free(fast)


def test_n_samples_and_rejected_blocks_freed(target):
    """n > 1 requests fork as usual (their samples then speculate); every block comes back."""
    llm = _llm(target, NGRAM, block_size=4)
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=20, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()[:3]], params, use_tqdm=False)
    assert all(len(o.outputs) == 3 and all(len(c.token_ids) == 20 for c in o.outputs) for o in outputs)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "supported methods: ngram, draft_model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "supported keys"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ("ngram", "must be a JSON object"),
])
def test_bad_config_is_an_error_naming_it(target, config, message):
    with pytest.raises(ValueError, match=message):
        _llm(target, config)


def test_draft_vocabulary_mismatch(tiny_model_dir, target):
    from transformers import LlamaConfig

    small = tiny_model_dir("llama_vocab512", LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         vocab_size=512, max_position_embeddings=1024))
    with pytest.raises(ValueError, match=r"vocabulary \(512 tokens\) differs from the target's \(1024\)"):
        _llm(target, {"model": small, "num_speculative_tokens": 2})


def test_beam_search_is_refused_with_speculation(target):
    from pagoda.sampling_params import BeamSearchParams

    llm = _llm(target, NGRAM)
    with pytest.raises(ValueError, match="speculative"):
        llm.llm_engine.add_request("beams", {"prompt_token_ids": [5, 6, 7]}, BeamSearchParams(beam_width=2,
                                                                                             max_tokens=4))


def test_ngram_lookup_matches_a_brute_force_search():
    """The vectorised lookup equals the obvious search: the longest suffix (max..min tokens) with an earlier
    occurrence, its first occurrence, and the up to k tokens after it."""
    import numpy as np

    from pagoda.core.spec_decode.ngram import find_ngram_proposal

    def brute(tokens, min_n, max_n, k):
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            suffix = tokens[len(tokens) - n:]
            for start in range(len(tokens) - n):
                if tokens[start:start + n] == suffix:
                    return tokens[start + n:start + n + k]
        return []

    rng = random.Random(3)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        min_n = rng.randrange(1, 4)
        max_n = min_n + rng.randrange(0, 3)
        k = rng.randrange(1, 5)
        got = find_ngram_proposal(np.asarray(tokens, dtype=np.int64), min_n, max_n, k).tolist()
        assert got == brute(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)
