"""The ``mp`` executor: worker processes give exactly the single-process greedy tokens (float32), a failure in a
worker is an ``ExecutorDeadError`` carrying its traceback, and no worker process outlives its engine.

The ``pagoda serve -tp 2`` test drives a real server through the ``openai`` client, kills one worker process in
the middle of a streamed request, and checks that the request fails, ``/health`` answers 503 and the server stops
cleanly — never a hang.
"""

from __future__ import annotations

import gc
import signal
import socket
import threading
import time

import psutil
import pytest
import requests

from pagoda import LLM, SamplingParams
from pagoda.core.scheduler import SchedulerOutput
from pagoda.executor.interface import ExecutorDeadError

from ..entrypoints.openai.conftest import TINY_ARGS, ServerProcess, reference_llm, tiny_chat_model_dir  # noqa: F401

PROMPTS = [[5, 6, 7, 8], list(range(10, 40)), [3] * 17]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _one_thread_on_loopback(monkeypatch):
    monkeypatch.setenv("PAGODA_CPU_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def _generate(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _engine_args(model_dir: str) -> dict:
    return dict(model=model_dir, dtype="float32", skip_tokenizer_init=True, max_model_len=256,
                kv_cache_memory_bytes=8 << 20)


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every process of ``pids`` has exited and been reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def single_process_tokens(tiny_model_dir):
    return _generate(LLM(**_engine_args(tiny_model_dir("llama"))))


def test_tp2_through_worker_processes_gives_the_single_process_tokens(tiny_model_dir, single_process_tokens,
                                                                      monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("VLLM_PORT", str(port))  # where the ranks meet, as with vLLM
    llm = LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=2)
    executor = llm.llm_engine.executor
    assert executor.distributed_init_method == f"tcp://127.0.0.1:{port}"
    assert executor.name == "mp" and llm.llm_engine.runner is None
    pids = executor.worker_pids
    assert len(pids) == 2 and executor.output_rank == 0
    assert _generate(llm) == single_process_tokens
    assert llm.llm_engine.get_stats().spec_decoding is None
    del llm, executor
    gc.collect()
    assert _gone(pids), "worker processes outlived their LLM"


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)])
def test_pipeline_stages_in_worker_processes_give_the_single_process_tokens(tiny_model_dir, single_process_tokens,
                                                                             tp, pp):
    llm = LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    executor = llm.llm_engine.executor
    assert len(executor.worker_pids) == tp * pp
    assert executor.output_rank == tp * pp - tp  # the first tensor-parallel rank of the last stage
    assert _generate(llm) == single_process_tokens
    llm.llm_engine.shutdown()


def test_one_worker_process_equals_uni_and_a_failing_step_is_fatal(tiny_model_dir, single_process_tokens):
    llm = LLM(**_engine_args(tiny_model_dir("llama")), distributed_executor_backend="mp")
    executor = llm.llm_engine.executor
    assert executor.name == "mp" and len(executor.worker_pids) == 1
    assert _generate(llm) == single_process_tokens
    pids = executor.worker_pids
    # A step naming a request the worker never saw raises inside the worker's runner.
    bad = SchedulerOutput(num_scheduled_tokens={"no-such-request": 1}, total_num_scheduled_tokens=1)
    with pytest.raises(ExecutorDeadError) as failure:
        executor.execute_model(bad)
    assert "worker rank 0 failed in execute_model" in str(failure.value)
    assert "Traceback" in str(failure.value) and "KeyError: 'no-such-request'" in str(failure.value)
    assert _gone(pids), "a failed executor left its workers running"
    with pytest.raises(ExecutorDeadError):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("feature, match", [
    # LoRA is refused twice over with tensor parallelism: by the layers (at configuration) and by mp
    ({"enable_lora": True}, "enable_lora: LoRA adapters are not supported with distributed_executor_backend 'mp'"
                            "|enable_lora is not supported with tensor_parallel_size 2"),
    ({"task": "embed"}, "task 'embed': pooling models are not supported with distributed_executor_backend 'mp'"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}},
     "speculative_config: speculative decoding is not supported with distributed_executor_backend 'mp'"),
])
def test_features_that_need_the_runner_in_process_are_refused(tiny_model_dir, feature, match):
    with pytest.raises(ValueError, match=match):  # at start-up, before any worker process exists
        LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=2, **feature)


def test_bad_start_method_is_an_error_naming_it(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "thread")
    with pytest.raises(ValueError, match="VLLM_WORKER_MULTIPROC_METHOD.*spawn, fork, forkserver"):
        LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=2)


def _worker_processes(server_pid: int) -> list[psutil.Process]:
    children = psutil.Process(server_pid).children()
    return [c for c in children if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in
            " ".join(c.cmdline())]


def test_server_with_worker_processes_answers_and_dies_cleanly_with_a_worker(tiny_chat_model_dir, reference_llm):
    import openai

    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--tensor-parallel-size", "2"],
                           env={"GLOO_SOCKET_IFNAME": "lo"})
    workers: list[psutil.Process] = []
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        completion = client.completions.create(model=tiny_chat_model_dir, prompt="The capital of", max_tokens=8,
                                               temperature=0)
        expected = reference_llm.generate(["The capital of"], SamplingParams(max_tokens=8, temperature=0),
                                          use_tqdm=False)[0].outputs[0].text
        assert completion.choices[0].text == expected
        workers = _worker_processes(server.proc.pid)
        assert len(workers) == 2, [w.cmdline() for w in workers]

        # A long streamed request is running when a worker is killed: it must end with an error, not hang.
        outcome: dict[str, object] = {}
        first_chunk = threading.Event()

        def stream() -> None:
            try:
                for _ in client.completions.create(model=tiny_chat_model_dir, prompt="Go", max_tokens=900,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    first_chunk.set()
                outcome["result"] = "finished"
            except Exception as exc:  # noqa: BLE001 - what the client saw
                outcome["result"] = exc
            first_chunk.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first_chunk.wait(60)
        workers[1].send_signal(signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "the streamed request hung after its worker died"
        assert outcome["result"] != "finished", "a request finished although its worker was killed"
        deadline = time.monotonic() + 10
        while requests.get(server.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200 with a dead worker"
            time.sleep(0.2)
        with pytest.raises(openai.APIError):
            client.completions.create(model=tiny_chat_model_dir, prompt="Again", max_tokens=2)
    finally:
        server.stop()
    assert _gone([w.pid for w in workers]), "worker processes outlived the server"
