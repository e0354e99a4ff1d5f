"""Sampling through the whole engine: n > 1 block sharing, seeds, stops, logprobs against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.core.request import child_request_id
from tests.conftest import _hf_model, assert_all_blocks_free, hf_greedy

PROMPTS = [[5, 17, 99, 4, 250, 3, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 15, 16, 23],
           [9, 8, 7], [300, 301, 302, 303, 304, 305, 306]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, block_size=8)


def _gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_top_k_1_and_tiny_top_p_equal_greedy(llm, model_dir):
    expected = hf_greedy(model_dir, PROMPTS, 12)
    for params in (SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True, seed=3),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True)):
        assert [o.outputs[0].token_ids for o in _gen(llm, PROMPTS, params)] == expected
    assert_all_blocks_free(llm)


def test_seeded_request_does_not_depend_on_its_neighbours(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _gen(llm, PROMPTS[:1], params)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": PROMPTS[1]}, {"prompt_token_ids": PROMPTS[0]},
                          {"prompt_token_ids": PROMPTS[2]}], [noisy, params, noisy], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = _gen(llm, PROMPTS[:1], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone
    assert_all_blocks_free(llm)


def test_n_samples_share_the_prompt_blocks(llm):
    engine = llm.llm_engine
    prompt = PROMPTS[0]  # 20 tokens: two full blocks of 8 and a partial one
    engine.add_request("fork", {"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))
    engine.step()  # prefill once, sample 3 tokens, fork
    children = [child_request_id("fork", i) for i in range(3)]
    blocks = [engine.kv_cache.req_blocks[c] for c in children]
    assert blocks[0] == blocks[1] == blocks[2] and len(blocks[0]) == 3
    assert [b.ref_cnt for b in blocks[0]] == [3, 3, 3]
    engine.step()  # each child writes into the shared partial block: copy-on-write for two of them
    after = [engine.kv_cache.req_blocks[c] for c in children]
    assert all(a[:2] == blocks[0][:2] for a in after) and blocks[0][0].ref_cnt == 3
    assert len({id(a[2]) for a in after}) == 3
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    (output,) = outputs
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    assert_all_blocks_free(llm)


def test_best_of_returns_the_most_likely_samples(llm):
    out = _gen(llm, PROMPTS[1:2], SamplingParams(n=2, best_of=4, temperature=1.0, seed=0, max_tokens=5,
                                                 ignore_eos=True, logprobs=0))[0]
    assert len(out.outputs) == 2
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores == sorted(scores, reverse=True)
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_max_tokens(llm, model_dir):
    expected = hf_greedy(model_dir, PROMPTS[:1], 10)[0]
    stop = expected[4]
    out = _gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop],
                                                ignore_eos=True))[0].outputs[0]
    first = expected.index(stop)
    assert out.token_ids == expected[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = _gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_logprobs_match_transformers(llm, model_dir):
    prompt = PROMPTS[0]
    out = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3,
                                             prompt_logprobs=2))[0]
    model = _hf_model(model_dir)
    completion = out.outputs[0]
    full = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(full).logits[0].double(), dim=-1)
    total = 0.0
    for step, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + step]
        top = row.topk(3)
        assert set(top.indices.tolist()) <= set(position)
        for token_id, logprob in position.items():
            assert logprob.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        assert position[token].rank == 1
        total += position[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, position in enumerate(out.prompt_logprobs[1:], start=1):
        actual = prompt[i]
        assert position[actual].logprob == pytest.approx(float(ref[i - 1, actual]), abs=1e-4)
        assert position[actual].rank == int((ref[i - 1] > ref[i - 1, actual]).sum()) + 1
        assert not math.isnan(position[actual].logprob)
    assert_all_blocks_free(llm)


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("gone", {"prompt_token_ids": PROMPTS[0]},
                       SamplingParams(n=2, temperature=1.0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv_cache.num_free_blocks < engine.config.cache.num_blocks
    engine.abort_request("gone")
    engine.step()
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("params", [
    SamplingParams(top_p=1e-300, max_tokens=3),  # rounds to 0 in float32
    SamplingParams(repetition_penalty=1e-300, max_tokens=3),  # overflows logits to inf
    SamplingParams(repetition_penalty=1e-300, top_p=0.5, seed=3, max_tokens=3),
    SamplingParams(seed=2 ** 70, max_tokens=3),
    SamplingParams(seed=-5, n=2, temperature=1.0, max_tokens=3),
], ids=["tiny_top_p", "huge_penalty", "huge_penalty_top_p", "big_seed", "negative_seed"])
def test_extreme_valid_values_do_not_break_the_engine(llm, params):
    out = _gen(llm, PROMPTS[1:2], params)[0]
    assert all(len(c.token_ids) == 3 for c in out.outputs)
    assert_all_blocks_free(llm)
