"""Runs a job in the processes of one multi-rank engine, for the pipeline-parallel tests.

Under ``external_launcher`` (SPMD, as torchrun runs it) every rank is a process of its own that builds the same
``LLM`` and runs the same job; identical inputs keep their schedulers in step. With an executor that starts its
own workers (``mp``, ``ray``) only the driver process runs the job. :data:`BACKEND` picks one for every test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable
from typing import Any

#: The executor backend the tests run under (``"mp"`` once that executor exists: the job then runs once).
BACKEND = "external_launcher"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, job: Callable, args: tuple,
               results: Any) -> None:
    env = {"GLOO_SOCKET_IFNAME": "lo", "PAGODA_CPU_THREADS": "1"}
    if backend == "external_launcher":
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, True, job(*args)))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results.put((rank, False, traceback.format_exc()))
    finally:
        from pagoda.distributed import destroy_model_parallel

        destroy_model_parallel()


def run_engine_ranks(job: Callable, *args: Any, world_size: int, backend: str = BACKEND,
                     timeout_s: float = 240.0) -> list[Any]:
    """``job(*args)`` in each process of an engine of ``world_size`` ranks (spawned); the results by rank (one
    result for executors that start their own workers). A rank's exception fails the call with its traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    num_procs = world_size if backend == "external_launcher" else 1
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, backend, job, args, results),
                         daemon=backend == "external_launcher") for rank in range(num_procs)]
    try:
        for proc in procs:
            proc.start()
        by_rank: dict[int, Any] = {}
        for _ in procs:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue_module.Empty:
                raise TimeoutError(f"engine ranks gave no result within {timeout_s:.0f} s "
                                   f"(got ranks {sorted(by_rank)})") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            by_rank[rank] = value
        return [by_rank[rank] for rank in range(num_procs)]
    finally:
        for proc in procs:
            proc.join(timeout=10)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
