"""Overload and abuse on a live server: a bounded queue answers 503 with Retry-After, oversized headers are
refused, and a storm of streams of which a third are dropped midway leaves every other answer complete and
correct, the engine healthy and every KV block free."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import openai
import pytest
import requests

from pagoda.sampling_params import SamplingParams

from .conftest import API_KEY, TINY_ARGS, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0:
            return metrics
        assert time.monotonic() < deadline, f"requests still running: {metrics}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_server(tiny_chat_model_dir):
    """Two running and two waiting requests at most; headers up to 4 KiB."""
    server = ServerProcess([tiny_chat_model_dir, "--dtype", "float32", "--max-model-len", "1024",
                            "--kv-cache-memory-bytes", str(16 << 20), "--max-num-seqs", "2",
                            "--max-waiting-requests", "2", "--max-header-bytes", "4096"])
    yield server
    server.stop()


def test_a_full_queue_answers_503_with_retry_after(small_server, tiny_chat_model_dir):
    body = {"prompt": "Fill the queue", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    streams = []
    try:
        for _ in range(4):  # two run, two wait: the server holds all it may
            response = requests.post(small_server.url + "/v1/completions", json=body, stream=True, timeout=60)
            assert response.status_code == 200
            streams.append(response)
        deadline = time.monotonic() + 20
        while small_server.metrics()["vllm:num_requests_waiting"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = requests.post(small_server.url + "/v1/completions", json={"prompt": "one more"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == 503 and "capacity" in error["message"]
        client = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=tiny_chat_model_dir, messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        # a request that could never fit is the client's mistake, not a reason to retry
        too_many = requests.post(small_server.url + "/v1/completions", timeout=10,
                                 json={"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 1})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    finally:
        for response in streams:
            response.close()  # the client leaves: each request is aborted and its place given back
    wait_idle(small_server)
    answer = requests.post(small_server.url + "/v1/completions", timeout=30,
                           json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2})
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 4


def test_oversized_headers_are_refused(small_server):
    response = requests.get(small_server.url + "/v1/models", headers={"X-Filler": "x" * 8000}, timeout=10)
    assert response.status_code == 431 and "4096" in response.json()["error"]["message"]
    try:  # 2 MB of headers: the HTTP parser stops buffering them, answers 400 and drops the connection
        status = requests.get(small_server.url + "/v1/models", timeout=10,
                              headers={f"X-{i}": "x" * 1000 for i in range(2000)}).status_code
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        status = None  # dropped while the client was still sending
    assert status in (None, 400, 431)
    assert requests.get(small_server.url + "/health", timeout=10).status_code == 200
    assert requests.get(small_server.url + "/v1/models", headers={"X-Filler": "x" * 1000},
                        timeout=10).status_code == 200


def test_storm_of_streams_with_a_third_dropped(tiny_server, reference_llm, tiny_chat_model_dir):
    prompts = [f"Storm {i}: the wind says" for i in range(12)]
    max_tokens = 32
    expected = [o.outputs[0].text for o in reference_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)]
    total, rng = 300, random.Random(19)
    plan = [(i % len(prompts), rng.random() < 1 / 3, rng.randint(0, max_tokens - 1)) for i in range(total)]

    async def one(session: aiohttp.ClientSession, prompt_index: int, drop: bool, drop_after: int):
        body = {"model": tiny_chat_model_dir, "prompt": prompts[prompt_index], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        async with session.post(tiny_server.url + "/v1/completions", json=body, headers=AUTH) as response:
            assert response.status == 200
            text, events = [], 0
            async for line in response.content:
                line = line.strip()
                if not line:
                    continue
                if drop and events >= drop_after:
                    return None  # leaving the block closes the connection mid-stream
                events += 1
                data = line.decode().removeprefix("data: ")
                if data == "[DONE]":
                    break
                text.append(json.loads(data)["choices"][0]["text"])
            return "".join(text)

    async def main():
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as session:
            return await asyncio.gather(*[one(session, *p) for p in plan])

    before = wait_idle(tiny_server)
    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    completed = [(p, r) for p, r in zip(plan, results) if not p[1]]
    assert len(completed) > total // 2
    for (prompt_index, _, _), text in completed:
        assert text == expected[prompt_index]
    metrics = wait_idle(tiny_server)
    assert metrics["vllm:kv_cache_usage_perc"] == 0.0  # every block of every dropped stream is back
    generated = metrics["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < total * max_tokens  # dropped streams were aborted, not run to the end
    assert requests.get(tiny_server.url + "/health", timeout=5).status_code == 200
    print(f"{total} streams, {total - len(completed)} dropped: {elapsed:.1f} s")
