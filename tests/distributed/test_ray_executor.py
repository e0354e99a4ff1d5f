"""The ``ray`` executor: worker actors give exactly the single-process greedy tokens (float32) — on a Ray instance
started by the test, and across two Ray nodes on loopback addresses (127.0.0.2 and 127.0.0.3), where the ranks
must land on distinct nodes.

Every Ray process the test starts is recorded by PID and stopped in ``finally`` (SIGTERM, then SIGKILL): never
``ray stop``, which would stop other people's Ray on a shared machine.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.executor.interface import ExecutorDeadError  # noqa: E402

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7, 8], list(range(10, 40))]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PAGODA_CPU_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO_ROOT)}


# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a one-node Ray on 127.0.0.1 but refuses a second node; the loopback
# addresses 127.0.0.2 and 127.0.0.3 are not rewritten by Ray, so the two-node test goes without it.
MULTI_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch):
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _engine_args(model_dir: str) -> dict:
    return dict(model=model_dir, dtype="float32", skip_tokenizer_init=True, max_model_len=256,
                kv_cache_memory_bytes=8 << 20)


def _generate(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def single_process_tokens(tiny_model_dir):
    return _generate(LLM(**_engine_args(tiny_model_dir("llama"))))


def test_tp2_on_a_local_ray_instance_gives_the_single_process_tokens_and_dies_with_an_actor(
        tiny_model_dir, single_process_tokens):
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp)
        llm = LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=2,
                  distributed_executor_backend="ray")
        executor = llm.llm_engine.executor
        assert executor.name == "ray" and len(executor.workers) == 2
        assert _generate(llm) == single_process_tokens
        pids = executor.worker_pids
        ray.kill(executor.workers[1])  # a rank that dies: the next step fails, and the rest is released
        with pytest.raises(ExecutorDeadError, match="worker rank 1 is gone"):
            _generate(llm)
        del llm, executor
        gc.collect()
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            assert time.monotonic() < deadline, "worker actors outlived their LLM"
            time.sleep(0.2)
        assert not ray.util.placement_group_table() or all(
            pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _ray_start(args: list[str], temp: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--num-cpus=1"],
                          timeout=120, capture_output=True, text=True,
                          env={**os.environ, **RAY_ENV, "RAY_TMPDIR": temp, **MULTI_NODE_ENV})
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def _our_ray_processes(temp: str) -> list[psutil.Process]:
    """Ray's processes started for this test: those naming its temp folder, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _stop(processes: list[psutil.Process]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in processes:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, processes = psutil.wait_procs(processes, timeout=5)
        if not processes:
            return


def test_two_ray_nodes_on_loopback_get_one_rank_each(tiny_model_dir, single_process_tokens, monkeypatch):
    temp = tempfile.mkdtemp(prefix="ray2", dir="/tmp")
    started: list[psutil.Process] = []
    try:
        with socket.socket() as sock:  # a free port for the head, whoever else runs Ray on this machine
            sock.bind(("127.0.0.2", 0))
            head = f"127.0.0.2:{sock.getsockname()[1]}"
        _ray_start(["--head", "--node-ip-address=127.0.0.2", f"--port={head.split(':')[1]}", f"--temp-dir={temp}",
                    "--include-dashboard=false", "--disable-usage-stats"], temp)
        _ray_start([f"--address={head}", "--node-ip-address=127.0.0.3"], temp)
        started = _our_ray_processes(temp)
        monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.2")
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
        ray.init(address=head, _node_ip_address="127.0.0.2")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        llm = LLM(**_engine_args(tiny_model_dir("llama")), tensor_parallel_size=2,
                  distributed_executor_backend="ray")
        executor = llm.llm_engine.executor
        assert executor.worker_nodes == ["127.0.0.2", "127.0.0.3"]  # the driver's node first
        assert _generate(llm) == single_process_tokens
        del llm, executor
        gc.collect()
        assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()
        _stop(started + _our_ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_ranks_go_driver_node_first_then_by_ip_and_nodes_must_have_their_own_ip():
    from pagoda.executor.ray_executor import rank_order

    # Workers 0..4 placed on three nodes; the driver runs on node "b".
    nodes = ["c", "a", "b", "c", "b"]
    ips = {"a": "10.0.0.9", "b": "10.0.0.20", "c": "10.0.0.3"}
    assert rank_order(nodes, ips, driver_node="b") == [2, 4, 0, 3, 1]  # b's, then c (10.0.0.3) before a (.9)
    assert rank_order(nodes, ips, driver_node="a") == [1, 0, 3, 2, 4]  # numeric IP order, not string order
    with pytest.raises(ValueError, match="unique IP address"):
        rank_order(["a", "b"], {"a": "127.0.0.1", "b": "127.0.0.1"}, driver_node="a")
