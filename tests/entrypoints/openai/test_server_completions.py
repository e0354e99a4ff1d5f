"""``/v1/models`` and ``/v1/completions`` against a live server, checked against ``pagoda.LLM``."""

from __future__ import annotations

import math

import pytest

from pagoda.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time, in a land", "1, 2, 3, 4,"]


def reference(llm, prompts, **kwargs):
    params = SamplingParams(temperature=0.0, **kwargs)
    return llm.generate(prompts, params, use_tqdm=False)


def test_models_lists_the_served_model(client, tiny_chat_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_chat_model_dir]
    assert models[0].object == "model"
    assert models[0].model_extra["max_model_len"] == 1024


def test_greedy_completion_matches_llm_generate(client, reference_llm, tiny_chat_model_dir):
    expected = reference(reference_llm, PROMPTS[0], max_tokens=12)[0]
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=12,
                                         temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_batch_of_prompts_and_token_ids(client, reference_llm, tiny_chat_model_dir):
    expected = reference(reference_llm, PROMPTS, max_tokens=6)
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.outputs[0].text for e in expected]
    assert response.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)

    ids = [e.prompt_token_ids for e in expected]
    single = client.completions.create(model=tiny_chat_model_dir, prompt=ids[1], max_tokens=6, temperature=0)
    assert single.choices[0].text == expected[1].outputs[0].text
    many = client.completions.create(model=tiny_chat_model_dir, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in many.choices] == [e.outputs[0].text for e in expected]


def test_stream_reassembles_to_the_full_text(client, tiny_chat_model_dir):
    full = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    stream = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_of_several_prompts(client, tiny_chat_model_dir):
    full = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS, max_tokens=8, temperature=0)
    texts = {i: "" for i in range(len(PROMPTS))}
    for chunk in client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS, max_tokens=8,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[i] for i in range(len(PROMPTS))] == [c.text for c in full.choices]


def test_n_and_seed(client, reference_llm, tiny_chat_model_dir):
    kwargs = dict(model=tiny_chat_model_dir, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=7)
    first = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage.completion_tokens == 24
    again = client.completions.create(**kwargs)  # a seed makes sampling reproducible
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    expected = reference_llm.generate(PROMPTS[2], SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=8),
                                      use_tqdm=False)[0]
    assert [c.text for c in first.choices] == [o.text for o in expected.outputs]
    streamed = {i: "" for i in range(3)}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]


def test_best_of_returns_the_most_likely(client, tiny_chat_model_dir):
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=5,
                                         temperature=1.0, n=2, best_of=4, seed=3, logprobs=0)
    assert len(response.choices) == 2
    totals = [sum(c.logprobs.token_logprobs) for c in response.choices]
    assert totals[0] >= totals[1] - 1e-4


def test_logprobs_match_the_engine(client, reference_llm, tiny_chat_model_dir):
    expected = reference(reference_llm, PROMPTS[0], max_tokens=5, logprobs=3)[0].outputs[0]
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=5,
                                         temperature=0, logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == response.choices[0].text
    for position, (token_id, entry) in enumerate(zip(expected.token_ids, expected.logprobs)):
        assert lp.token_logprobs[position] == pytest.approx(entry[token_id].logprob, abs=1e-4)
        assert 3 <= len(lp.top_logprobs[position]) <= 4
        # greedy: the chosen token is the most likely one
        assert lp.token_logprobs[position] == pytest.approx(max(lp.top_logprobs[position].values()), abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(math.isfinite(v) for v in lp.token_logprobs)


def test_echo_with_prompt_logprobs(client, tiny_chat_model_dir):
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=3,
                                         temperature=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text.startswith(PROMPTS[0])
    lp = choice.logprobs
    num_prompt = response.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text


def test_stop_strings(client, tiny_chat_model_dir):
    full = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of the greedy text
    cut = full[:full.index(stop)]
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20,
                                         temperature=0, stop=[stop])
    assert response.choices[0].text == cut
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                     stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=tiny_chat_model_dir, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop], stream=True))
    assert streamed == cut


def test_vllm_extra_sampling_fields(client, reference_llm, tiny_chat_model_dir):
    extra = {"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.3, "ignore_eos": True, "min_tokens": 4,
             "stop_token_ids": [2], "skip_special_tokens": True}
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=7,
                                         temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
                                         user="someone", extra_body=extra)
    params = SamplingParams(temperature=0, max_tokens=7, presence_penalty=0.5, frequency_penalty=0.5, **extra)
    expected = reference_llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text
    assert response.choices[0].text == expected
    # the fields reach the engine: a stop token id taken from the greedy text ends the completion there
    greedy = reference(reference_llm, PROMPTS[0], max_tokens=7)[0].outputs[0]
    stop_id = greedy.token_ids[3]
    stopped = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=7,
                                        temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop_id
    assert stopped.usage.completion_tokens == greedy.token_ids.index(stop_id) + 1
    biased = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       logit_bias={"1000": 100.0})
    forced = reference(reference_llm, PROMPTS[0], max_tokens=4, logit_bias={1000: 100.0})[0].outputs[0]
    assert forced.token_ids == [1000] * 4 and biased.choices[0].text == forced.text


def test_one_log_line_per_request_with_the_prompt_cut(client, tiny_server, tiny_chat_model_dir):
    prompt = "A" * 30 + "B" * 10 + "C" * 60  # the test server cuts logged prompts at 40 characters
    response = client.completions.create(model=tiny_chat_model_dir, prompt=prompt, max_tokens=3, temperature=0)
    lines = [line for line in tiny_server.output().splitlines() if response.id in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "finished" in line and f"prompt {response.usage.prompt_tokens} tokens" in line
    assert "generated 3 tokens" in line
    assert "A" * 30 + "B" * 10 in line and "C" not in line.split("prompt=")[1]


def test_streamed_echo_and_logprobs_match_the_full_response(client, tiny_chat_model_dir):
    kwargs = dict(model=tiny_chat_model_dir, prompt=PROMPTS[2], max_tokens=6, temperature=0, echo=True, logprobs=2)
    full = client.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.completions.create(**kwargs, stream=True,
                                                   stream_options={"include_usage": True,
                                                                   "continuous_usage_stats": True})]
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in choices) == full.text
    assert [t for c in choices for t in c.logprobs.tokens] == full.logprobs.tokens
    assert [v for c in choices for v in c.logprobs.token_logprobs] == full.logprobs.token_logprobs
    usages = [c.usage.completion_tokens for c in chunks if c.choices]
    assert usages == sorted(usages) and usages[-1] == 6  # continuous usage counts up
