"""A failure inside the engine loop: in-flight requests fail with 500 (or an SSE error event), ``/health``
turns 503, and new requests are refused, instead of a server that accepts work it can't do.

The server runs in this process (uvicorn on a thread) around a real engine whose ``step`` is made to raise
once two requests are running: a fault injected by the test, not a switch in the server.
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
from pagoda.entrypoints.openai.async_engine import AsyncEngine
from pagoda.entrypoints.openai.metrics import ServerMetrics
from pagoda.entrypoints.openai.serving_engine import ServerConfig

from .conftest import free_port


@pytest.fixture()
def failing_server(tiny_chat_model_dir):
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_chat_model_dir, dtype="float32", max_model_len=1024,
                                                   kv_cache_memory_bytes=16 << 20))
    real_step = engine.step
    armed = threading.Event()

    def step():
        if armed.is_set():
            raise RuntimeError("simulated device fault")
        return real_step()

    engine.step = step
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
    yield f"http://127.0.0.1:{port}", async_engine, armed
    server.should_exit = True
    thread.join(30)


def test_engine_failure_fails_requests_and_health(failing_server):
    url, async_engine, armed = failing_server
    assert requests.get(url + "/health", timeout=5).status_code == 200
    body = {"prompt": "Keep going", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "response", requests.post(url + "/v1/completions", json=body, timeout=60)))
    thread.start()
    stream = requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
    assert stream.status_code == 200
    events = []
    for line in stream.iter_lines():
        if not line:
            continue
        events.append(line.decode().removeprefix("data: "))
        if len(events) == 3:  # both requests are in the engine's batch by now; break the engine
            deadline = time.monotonic() + 10
            while async_engine.stats.num_running < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            armed.set()
    thread.join(60)

    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "simulated device fault" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])

    response = result["response"]
    assert response.status_code == 500
    assert "simulated device fault" in response.json()["error"]["message"]

    health = requests.get(url + "/health", timeout=5)
    assert health.status_code == 503 and "simulated device fault" in health.json()["error"]["message"]
    refused = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert refused.status_code == 500 and refused.json()["error"]["code"] == 500
