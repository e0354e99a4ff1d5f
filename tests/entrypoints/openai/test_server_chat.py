"""``/v1/chat/completions``, ``/tokenize`` and ``/detokenize`` against a live server, checked against
``pagoda.LLM.chat`` and the tokenizer."""

from __future__ import annotations

import requests

from pagoda.sampling_params import SamplingParams

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]


def llm_chat(llm, messages, **kwargs):
    params = SamplingParams(temperature=0.0, **kwargs)
    return llm.chat(messages, params, use_tqdm=False)[0]


def test_greedy_chat_matches_llm_chat(client, reference_llm, tiny_chat_model_dir):
    expected = llm_chat(reference_llm, MESSAGES, max_tokens=10)
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=10,
                                              temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 10


def test_content_parts_and_max_completion_tokens(client, reference_llm, tiny_chat_model_dir):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    expected = llm_chat(reference_llm, [{"role": "user", "content": "Hello\nthere"}], max_tokens=6)
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=parts,
                                              max_completion_tokens=6, temperature=0)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.completion_tokens == 6


def test_default_max_tokens_is_the_rest_of_the_context(client, tiny_chat_model_dir):
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == 1024


def test_stream_reassembles_with_role_first_and_usage_last(client, tiny_chat_model_dir):
    full = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=15,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=15,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_n_choices_stream_and_non_stream(client, tiny_chat_model_dir):
    kwargs = dict(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=6, temperature=0.9, n=2, seed=11)
    full = client.chat.completions.create(**kwargs)
    assert [c.index for c in full.choices] == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in full.choices]


def test_logprobs_and_top_logprobs(client, reference_llm, tiny_chat_model_dir):
    expected = llm_chat(reference_llm, MESSAGES, max_tokens=4, logprobs=2).outputs[0]
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry, token_id, position in zip(content, expected.token_ids, expected.logprobs):
        assert abs(entry.logprob - position[token_id].logprob) < 1e-4
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the top token
        assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=2,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_stop_and_extras(client, reference_llm, tiny_chat_model_dir):
    full = llm_chat(reference_llm, MESSAGES, max_tokens=12).outputs[0].text
    stop = full[4:7]
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, max_tokens=12,
                                              temperature=0, stop=stop,
                                              extra_body={"top_k": 3, "repetition_penalty": 1.0})
    assert response.choices[0].message.content == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_continue_final_message_and_template_kwargs(client, reference_llm, tiny_chat_model_dir):
    messages = MESSAGES + [{"role": "assistant", "content": "Red, green"}]
    expected = reference_llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False,
                                  add_generation_prompt=False, continue_final_message=True)[0]
    response = client.chat.completions.create(
        model=tiny_chat_model_dir, messages=messages, max_tokens=5, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True,
                    "chat_template_kwargs": {"unused_flag": True}})
    assert response.choices[0].message.content == expected.outputs[0].text


def test_tokenize_and_detokenize(tiny_server, reference_llm):
    tokenizer = reference_llm.get_tokenizer()
    body = requests.post(tiny_server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True},
                         timeout=10).json()
    assert body["tokens"] == tokenizer.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = requests.post(tiny_server.url + "/tokenize", json={"messages": MESSAGES}, timeout=10).json()
    assert chat["tokens"] == llm_chat(reference_llm, MESSAGES, max_tokens=1).prompt_token_ids
    back = requests.post(tiny_server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=10).json()
    assert back == {"prompt": "Hello world"}
