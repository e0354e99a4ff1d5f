"""``pagoda serve`` with no model: the bundled SmolLM2-135M-Instruct, checked against ``pagoda.LLM``."""

from __future__ import annotations

import openai
import pytest

from pagoda.sampling_params import SamplingParams

from .conftest import ServerProcess

ARGS = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(128 << 20), "--max-num-seqs", "8"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_server():
    server = ServerProcess(ARGS)  # no MODEL, no --model
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default_llm():
    from pagoda import LLM

    return LLM(max_model_len=2048, kv_cache_memory_bytes=128 << 20, max_num_seqs=8)


@pytest.fixture(scope="module")
def default_client(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_serves_the_bundled_model_under_its_name(default_client, default_llm):
    names = [m.id for m in default_client.models.list().data]
    assert names == [default_llm.llm_engine.model_config.served_model_name]


def test_chat_answers_like_llm_chat(default_client, default_llm):
    expected = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    model = default_client.models.list().data[0].id
    response = default_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=30,
                                                      temperature=0)
    text = response.choices[0].message.content
    assert text == expected.outputs[0].text
    assert "Paris" in text
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in default_client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=30, temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_completion_matches_llm_generate(default_client, default_llm):
    prompt = "The three primary colours are"
    expected = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    model = default_client.models.list().data[0].id
    response = default_client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.outputs[0].text
