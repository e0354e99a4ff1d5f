"""A failure inside an engine step: the requests of that step fail with 500 (or an SSE error event) and free
their blocks while the engine serves the others; only steps that keep failing make ``/health`` answer 503 and
new requests be refused — never a hang, never a 200 from a dead engine.

The server runs in this process (uvicorn on a thread) around a real engine whose model runner is made to raise
while the test says so: a fault injected by the test, not a switch in the server.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import uvicorn

from pagoda.core.engine import LLMEngine
from pagoda.core.engine_args import EngineArgs
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.entrypoints.openai.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine
from pagoda.entrypoints.openai.metrics import ServerMetrics
from pagoda.entrypoints.openai.serving_engine import ServerConfig

from ...conftest import assert_all_blocks_free
from .conftest import free_port

LONG = {"prompt": "Keep going", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


class Fault:
    """Makes the model runner raise on its next ``times`` calls (a device fault in the middle of a step)."""

    def __init__(self, engine: LLMEngine):
        self.remaining = 0
        self.lock = threading.Lock()
        real = engine.runner.execute

        def execute(sched):
            with self.lock:
                if self.remaining > 0:
                    self.remaining -= 1
                    raise RuntimeError("simulated device fault")
            return real(sched)

        engine.runner.execute = execute

    def arm(self, times: int) -> None:
        with self.lock:
            self.remaining = times


@pytest.fixture()
def faulty_server(tiny_chat_model_dir):
    # one request runs at a time, so a second one waits outside the step that fails
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_chat_model_dir, dtype="float32", max_model_len=1024,
                                                   kv_cache_memory_bytes=16 << 20, max_num_seqs=1))
    fault = Fault(engine)
    async_engine = AsyncEngine(engine)
    async_engine.metrics = ServerMetrics("tiny", lambda: async_engine.stats)
    app = build_app(async_engine, ServerConfig(served_model_names=["tiny"]), stats_interval_s=None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", async_engine, fault
    server.should_exit = True
    thread.join(30)


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(faulty_server):
    url, async_engine, fault = faulty_server
    stream = requests.post(url + "/v1/completions", json={**LONG, "stream": True}, stream=True, timeout=60)
    assert stream.status_code == 200
    lines = stream.iter_lines()
    first = next(line for line in lines if line)  # the streamed request is running
    assert "choices" in first.decode()
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("response", requests.post(
        url + "/v1/completions", json={"prompt": "Wait your turn", "max_tokens": 8, "temperature": 0}, timeout=60)))
    thread.start()
    _wait(lambda: async_engine.stats.num_waiting == 1)
    fault.arm(1)
    events = [line.decode().removeprefix("data: ") for line in lines if line]
    thread.join(60)

    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "simulated device fault" in error["message"]
    response = waiting["response"]  # it waited outside the failed step, and completed
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    assert requests.get(url + "/health", timeout=5).status_code == 200
    again = requests.post(url + "/v1/completions", json={**LONG, "max_tokens": 5}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
    _wait(lambda: not async_engine.engine.has_unfinished_requests())
    assert_all_blocks_free(async_engine.engine)  # read while idle: the engine thread only waits on its inbox


def test_steps_that_keep_failing_make_the_engine_dead(faulty_server):
    url, async_engine, fault = faulty_server
    fault.arm(1000)
    for attempt in range(MAX_CONSECUTIVE_STEP_FAILURES):
        response = requests.post(url + "/v1/completions", json=LONG, timeout=60)
        assert response.status_code == 500 and "simulated device fault" in response.json()["error"]["message"]
        expected = 200 if attempt < MAX_CONSECUTIVE_STEP_FAILURES - 1 else 503
        assert requests.get(url + "/health", timeout=5).status_code == expected
    health = requests.get(url + "/health", timeout=5)
    assert health.status_code == 503 and "in a row" in health.json()["error"]["message"]
    refused = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert refused.status_code == 500 and refused.json()["error"]["code"] == 500
    stream = requests.post(url + "/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert stream.status_code == 500
