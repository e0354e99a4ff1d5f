"""Data parallelism (``-dp N``): replicas in their own processes behind one server or ``LLM``.

Real servers (``pagoda serve`` subprocesses) and real replica processes on the tiny chat model, compared with one
engine (``-dp 1``); the per-replica ``/metrics`` series show where requests went.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from pagoda.engine_dp.balance import pick_replica
from tests.entrypoints.openai.conftest import TINY_ARGS, ServerProcess, tiny_chat_model_dir  # noqa: F401

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Hello, my name is"]
LLM_ARGS = dict(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=32 << 20)


def replica_metric(server: ServerProcess, name: str) -> dict[str, float]:
    """``pagoda:dp_engine_<name>`` per replica: ``{engine label: value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"pagoda:dp_engine_{name}":
                values[sample.labels["engine"]] = sample.value
    return values


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def dp_server(tiny_chat_model_dir):  # noqa: F811 - the fixture imported above
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "-dp", "2"])
    yield server
    server.stop()


# ---------------------------------------------------------------------------- balancing (no processes)
def test_pick_replica_prefers_fewest_unfinished_then_waiting_then_round_robin():
    assert pick_replica([3, 1, 2], [0, 0, 0], 0) == 1
    assert pick_replica([2, 2], [1, 0], 0) == 1  # tie on unfinished: fewer waiting
    assert pick_replica([2, 2], [0, 0], 1) == 1  # full tie: the round-robin start
    assert pick_replica([2, 2, 2], [0, 0, 0], 2) == 2
    with pytest.raises(ValueError, match="one count per replica"):
        pick_replica([1, 2], [0], 0)


def test_each_replica_gets_its_own_devices(monkeypatch):
    from pagoda.engine_dp.placement import replica_devices
    from pagoda.platforms.cpu import CpuPlatform
    from pagoda.platforms.cuda import CudaPlatform

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6")
    assert replica_devices(CudaPlatform, 2, 2) == [{"CUDA_VISIBLE_DEVICES": "3,4"}, {"CUDA_VISIBLE_DEVICES": "5,6"}]
    assert replica_devices(CudaPlatform, 4, 1)[3] == {"CUDA_VISIBLE_DEVICES": "6"}
    with pytest.raises(ValueError, match=r"data_parallel_size: 2 replicas of 4 device\(s\) each need 8 cuda devices, "
                                         r"but 4 are visible \(CUDA_VISIBLE_DEVICES=3,4,5,6\)"):
        replica_devices(CudaPlatform, 2, 4)
    assert replica_devices(CpuPlatform, 2, 1) == [{}, {}]  # the host's cores are shared by threads


# ---------------------------------------------------------------------------- the server
def test_dp2_answers_with_the_same_greedy_text_as_one_engine(dp_server, tiny_chat_model_dir):  # noqa: F811
    def answers(server: ServerProcess) -> list[str]:
        client = client_for(server)

        def complete(prompt: str) -> str:
            return client.completions.create(model=None or client.models.list().data[0].id, prompt=prompt,
                                             max_tokens=16, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: both replicas serve some
            texts = list(pool.map(complete, PROMPTS))
        chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": "Say something"}])
        return texts + [chat.choices[0].message.content]

    single = ServerProcess([tiny_chat_model_dir, *TINY_ARGS])
    try:
        expected = answers(single)
    finally:
        single.stop()
    assert answers(dp_server) == expected


def test_concurrent_requests_are_spread_over_the_replicas(dp_server):
    before = replica_metric(dp_server, "requests_total")
    client = client_for(dp_server)
    model = client.models.list().data[0].id
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.completions.create(model=model, prompt=f"Request {i}", max_tokens=24,
                                                          temperature=0, extra_body={"ignore_eos": True}),
                      range(8)))
    after = replica_metric(dp_server, "requests_total")
    routed = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert set(routed) == {"0", "1"}
    assert sum(routed.values()) == 8
    assert min(routed.values()) >= 2, routed  # balanced, not all on one replica
    wait_for(lambda: sum(replica_metric(dp_server, "num_requests_unfinished").values()) == 0, 10,
             "every request finished")


def test_cancelled_stream_is_aborted_in_its_replica(dp_server):
    client = client_for(dp_server)
    model = client.models.list().data[0].id
    before_routed = replica_metric(dp_server, "requests_total")
    before_tokens = dp_server.metrics()["vllm:generation_tokens_total"]
    stream = client.completions.create(model=model, prompt="Keep going", max_tokens=1000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()  # the client goes away mid-generation
    after_routed = replica_metric(dp_server, "requests_total")
    (replica,) = [e for e in after_routed if after_routed[e] != before_routed.get(e, 0.0)]
    wait_for(lambda: replica_metric(dp_server, "num_requests_running")[replica] == 0
             and replica_metric(dp_server, "num_requests_unfinished")[replica] == 0, 10,
             f"replica {replica} dropped the cancelled request")
    generated = dp_server.metrics()["vllm:generation_tokens_total"] - before_tokens
    assert generated < 1000  # stopped by the abort, not by max_tokens


def test_killed_replica_fails_open_requests_and_health_turns_503(dp_server):
    """(Last of the server's tests: it kills one of its replicas.)"""
    server = dp_server
    match = re.search(r"2 engine replicas ready \(processes (\d+), (\d+)\)", server.output())
    assert match, server.output()
    try:
        client = client_for(server)
        model = client.models.list().data[0].id
        started = threading.Event()
        outcome: list[BaseException | str] = []

        def stream_long() -> None:
            try:
                for _ in client.completions.create(model=model, prompt="Keep going", max_tokens=1000,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    started.set()
                outcome.append("finished")
            except Exception as exc:  # noqa: BLE001 - the failure is what the test expects
                outcome.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=stream_long)
        thread.start()
        assert started.wait(30)
        os.kill(int(match.group(1)), signal.SIGKILL)
        thread.join(15)
        assert not thread.is_alive(), "the open request hangs after its engine's replica died"
        assert outcome and isinstance(outcome[0], openai.APIError), outcome
        assert "replica 0" in str(outcome[0])
        wait_for(lambda: requests.get(server.url + "/health", timeout=5).status_code == 503, 10, "/health 503")
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=model, prompt="Hello", max_tokens=4)
        assert refused.value.status_code in (500, 503)
    finally:
        server.stop()
    for pid in match.groups():  # no replica outlives its server
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 15, f"replica {pid} exited")


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------------------- offline LLM
def test_llm_with_two_replicas_matches_one_engine(tiny_chat_model_dir):  # noqa: F811
    from pagoda import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = PROMPTS + [f"Prompt number {i}" for i in range(4)]
    expected = [o.outputs[0].token_ids for o in LLM(tiny_chat_model_dir, **LLM_ARGS).generate(prompts, params,
                                                                                              use_tqdm=False)]
    llm = LLM(tiny_chat_model_dir, data_parallel_size=2, **LLM_ARGS)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        stats = llm.llm_engine.get_stats()
        assert [r.requests_total for r in stats.replicas] == [4, 4]
        assert stats.generation_tokens_total == 12 * len(prompts)
        with pytest.raises(ValueError, match="maximum model length is 1024"):  # checked before it is sent
            llm.generate([[5] * 1024], params, use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    finally:
        llm.llm_engine.shutdown()


def test_unsupported_combinations_name_data_parallel_size(tiny_chat_model_dir):  # noqa: F811
    from pagoda import LLM
    from pagoda.core.engine import LLMEngine
    from pagoda.core.engine_args import EngineArgs

    with pytest.raises(ValueError, match="enable_lora.*data_parallel_size 2"):
        LLM(tiny_chat_model_dir, data_parallel_size=2, enable_lora=True, **LLM_ARGS)
    with pytest.raises(ValueError, match="data_parallel_size: an LLMEngine is one replica"):
        LLMEngine.from_engine_args(EngineArgs(model=tiny_chat_model_dir, data_parallel_size=2, **LLM_ARGS))
