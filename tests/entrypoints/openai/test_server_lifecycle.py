"""Aborts on disconnect, many concurrent clients, metrics, graceful SIGTERM, and an engine that fails."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import openai
import pytest
import requests

from pagoda.sampling_params import SamplingParams

from .conftest import API_KEY, TINY_ARGS, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"max_tokens": 1000, "temperature": 0, "extra_body": {"ignore_eos": True}}


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits; the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0:
            return metrics
        assert time.monotonic() < deadline, f"requests still running: {metrics}"
        time.sleep(0.05)


def wait_running(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics["vllm:num_requests_running"] >= 1:
            return metrics
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)


def test_closed_stream_is_aborted_and_frees_its_blocks(client, tiny_server, tiny_chat_model_dir):
    before = wait_idle(tiny_server)
    stream = client.completions.create(model=tiny_chat_model_dir, prompt="Tell me everything", stream=True,
                                       **LONG)
    for _, _chunk in zip(range(3), stream):
        pass
    during = tiny_server.metrics()
    assert during["vllm:num_requests_running"] == 1 and during["vllm:kv_cache_usage_perc"] > 0
    stream.close()
    after = wait_idle(tiny_server)
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 1000  # it stopped early: aborted, not finished
    assert after.get("vllm:request_success_total", 0) == before.get("vllm:request_success_total", 0)


def test_non_streamed_request_of_a_departed_client_is_aborted(tiny_server, tiny_chat_model_dir):
    before = wait_idle(tiny_server)
    body = {"model": tiny_chat_model_dir, "prompt": "Go on and on", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True}
    with requests.Session() as session:
        thread = threading.Thread(target=_post_and_give_up, args=(session, tiny_server.url, body))
        thread.start()
        wait_running(tiny_server)
        thread.join()
    after = wait_idle(tiny_server)
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 1000


def _post_and_give_up(session, url, body):
    with pytest.raises(requests.exceptions.ReadTimeout):
        session.post(url + "/v1/completions", json=body, headers=AUTH, timeout=(5, 0.5))


def test_fifty_concurrent_streams_all_complete_correctly(tiny_server, reference_llm, tiny_chat_model_dir):
    prompts = [f"Item {i}: the colour of the sky is" for i in range(50)]
    expected = reference_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    aclient = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    peak_running = []

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=tiny_chat_model_dir, prompt=prompt, max_tokens=16,
                                                  temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def bad() -> int:  # bad input interleaved with the good requests breaks nothing
        with pytest.raises(openai.BadRequestError):
            await aclient.completions.create(model=tiny_chat_model_dir, prompt="x", max_tokens=5000)
        return 0

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            metrics = await asyncio.to_thread(tiny_server.metrics)
            peak_running.append(metrics["vllm:num_requests_running"])
            await asyncio.sleep(0.05)

    async def main():
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        results = await asyncio.gather(*[one(p) for p in prompts], *[bad() for _ in range(5)])
        done.set()
        await watcher
        await aclient.close()
        return results[:50]

    start = time.monotonic()
    texts = asyncio.run(main())
    elapsed = time.monotonic() - start
    assert texts == [e.outputs[0].text for e in expected]
    assert max(peak_running) > 1, "requests from different clients should share engine steps"
    print(f"50 concurrent streams of 16 tokens: {elapsed:.2f} s, peak running {max(peak_running):.0f}")
    assert wait_idle(tiny_server)["vllm:kv_cache_usage_perc"] == 0.0


def test_metrics_parse_and_count(client, tiny_server, tiny_chat_model_dir):
    from prometheus_client.parser import text_string_to_metric_families

    before = tiny_server.metrics()
    client.completions.create(model=tiny_chat_model_dir, prompt="count me", max_tokens=4, temperature=0)
    after = wait_idle(tiny_server)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 4
    assert after["vllm:prompt_tokens_total"] > before["vllm:prompt_tokens_total"]
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    assert after["vllm:time_per_output_token_seconds_count"] >= before["vllm:time_per_output_token_seconds_count"] + 3
    response = requests.get(tiny_server.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert families["vllm:num_requests_running"] == "gauge"
    assert families["vllm:num_requests_waiting"] == "gauge"
    assert families["vllm:kv_cache_usage_perc"] == "gauge"
    assert families["vllm:prompt_tokens"] == "counter"
    assert families["vllm:generation_tokens"] == "counter"
    assert families["vllm:num_preemptions"] == "counter"
    assert families["vllm:time_to_first_token_seconds"] == "histogram"
    assert families["vllm:time_per_output_token_seconds"] == "histogram"
    deadline = time.monotonic() + 10
    while "throughput: prompt" not in tiny_server.output():  # the periodic stats line (every 2 s here)
        assert time.monotonic() < deadline, "no throughput line in the server log"
        time.sleep(0.2)


def test_sigterm_drains_in_flight_requests_then_exits(tiny_chat_model_dir):
    template = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}"
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--shutdown-timeout", "60", "--served-model-name",
                            "alpha", "beta", "--chat-template", template, "--root-path", "/api",
                            "--trust-request-chat-template"],
                           env={"VLLM_API_KEY": "env-key"})
    try:
        headers = {"Authorization": "Bearer env-key"}
        # the env key applies (and with --root-path, where the ASGI path carries the prefix)
        assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
        models = requests.get(server.url + "/v1/models", headers=headers, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
        answer = requests.post(server.url + "/v1/completions", headers=headers, timeout=30,
                               json={"model": "beta", "prompt": "hi", "max_tokens": 2}).json()
        assert answer["model"] == "beta"
        tokens = requests.post(server.url + "/tokenize", timeout=10,
                               json={"messages": [{"role": "user", "content": "hey"}]}).json()["tokens"]
        detok = requests.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=10).json()
        assert detok["prompt"] == "<<user>>hey"  # --chat-template replaced the model's
        own = requests.post(server.url + "/tokenize", timeout=10, json={
            "messages": [{"role": "user", "content": "hey"}], "chat_template": "[{{ messages[0].content }}]"})
        assert own.json()["tokens"] == requests.post(server.url + "/tokenize", json={"prompt": "[hey]"},
                                                     timeout=10).json()["tokens"]
        path = requests.post(server.url + "/tokenize", timeout=10, json={
            "messages": [{"role": "user", "content": "hey"}], "chat_template": "/etc/hostname.txt"})
        assert path.status_code == 400 and path.json()["error"]["param"] == "chat_template"
        result = {}

        def long_request():
            body = {"prompt": "Drain me", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
            result["response"] = requests.post(server.url + "/v1/completions", json=body, headers=headers,
                                               timeout=120)

        thread = threading.Thread(target=long_request)
        thread.start()
        wait_running(server)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(requests.ConnectionError):  # no new connections while draining
            requests.get(server.url + "/health", timeout=5)
        thread.join(120)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 1000
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_requests_left_at_the_shutdown_deadline_end_with_503(tiny_chat_model_dir):
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--shutdown-timeout", "0.5"])
    try:
        result = {}
        body = {"prompt": "Never ends", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

        def plain():
            result["plain"] = requests.post(server.url + "/v1/completions", json=body, timeout=60)

        def streamed():
            with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                               timeout=60) as response:
                result["events"] = [line.decode() for line in response.iter_lines() if line]

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while server.metrics()["vllm:num_requests_running"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - start < 10
        plain_response = result["plain"]
        assert plain_response.status_code == 503
        assert "shutting down" in plain_response.json()["error"]["message"]
        events = result["events"]
        assert events[-1] == "data: [DONE]"
        assert '"code": 503' in events[-2] and "shutting down" in events[-2]
    finally:
        server.stop()


def test_sigint_drains_like_sigterm(tiny_chat_model_dir):
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--shutdown-timeout", "60"])
    try:
        result = {}
        body = {"prompt": "Interrupt me", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        thread = threading.Thread(target=lambda: result.setdefault("response", requests.post(
            server.url + "/v1/completions", json=body, timeout=120)))
        thread.start()
        wait_running(server)
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C in the terminal that runs the server
        thread.join(120)
        response = result["response"]
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 300
        assert server.proc.wait(60) == 0
        assert "SIGINT received" in server.output()
    finally:
        server.stop()
