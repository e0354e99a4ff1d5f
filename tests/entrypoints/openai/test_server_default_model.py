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


def _server_params(llm, **fields) -> SamplingParams:
    """What the server samples with for a request that sets ``fields``: the model's defaults for the rest."""
    return SamplingParams.from_generation_config(llm.llm_engine.generation_config, **fields)


def test_chat_answers_like_llm_chat(default_client, default_llm):
    expected = default_llm.chat(QUESTION, _server_params(default_llm, temperature=0, max_tokens=30),
                                use_tqdm=False)[0]
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
    expected = default_llm.generate(prompt, _server_params(default_llm, temperature=0, max_tokens=12),
                                    use_tqdm=False)[0]
    model = default_client.models.list().data[0].id
    response = default_client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.outputs[0].text


FIRST_QUESTIONS = ["Write one sentence about cats.", "What is 12 times 7?", "Hi!", "What is the capital of France?",
                   "Give me three tips for sleeping better.", "Tell me a joke.",
                   "Explain photosynthesis in simple terms.", "Translate 'good morning' into Spanish.",
                   "Who wrote Romeo and Juliet?", "Write a haiku about the sea."]


def _readable(text: str) -> bool:
    """Words and punctuation, not a loop: most characters are ordinary text and no run of three words recurs
    more than ten times, or once per 15 words in a long reply (a runaway reply repeats one for hundreds of tokens;
    an honest retelling or worked sum says "Romeo and Juliet" or "12 * 7" four to seven times)."""
    words = text.split()
    if not words:  # length is bounded by the caller's token check (a list of twelve tips runs past 400 words)
        return False
    ordinary = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-*#%/&" for ch in text)
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    most = max((trigrams.count(t) for t in set(trigrams)), default=0)
    return ordinary >= 0.9 * len(text) and most <= max(10, len(words) // 15)


def test_default_chat_requests_end_at_eos_with_readable_replies(default_client):
    """A new user's first requests: no sampling fields at all. The bundled model's defaults must make each reply
    end by itself (at EOS), short and readable — not run on until the context is full."""
    import concurrent.futures

    model = default_client.models.list().data[0].id

    def ask(question: str):
        return default_client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}])

    def good(reply) -> bool:
        text = reply.choices[0].message.content
        return reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 600 and _readable(text)

    with concurrent.futures.ThreadPoolExecutor(len(FIRST_QUESTIONS)) as pool:
        replies = list(pool.map(ask, FIRST_QUESTIONS))
    # Sampled replies of a 135M model: now and then one rambles on past 600 tokens or falls into a loop (measured
    # on 96 samples each: "three tips for sleeping better" runs long 7% of the time, the haiku loops 1-4%). A user
    # asks again; what the defaults must not do is make that common, so each question gets two more tries and
    # must then have ended readably. Greedy decoding with no repetition penalty loops on Romeo and Juliet every try.
    for _ in range(2):
        replies = [reply if good(reply) else ask(question) for question, reply in zip(FIRST_QUESTIONS, replies)]
    for question, reply in zip(FIRST_QUESTIONS, replies):
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 600, (question, text[:300])
        assert _readable(text), (question, text)
