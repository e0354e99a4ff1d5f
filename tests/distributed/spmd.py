"""Run engines over several ranks from a test: each rank a spawned process, SPMD style.

With ``EXECUTOR = "external_launcher"`` every rank is a process started here with torchrun's variables (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) that builds its own engine on the same inputs;
rank 0's results come back. With an executor that starts its own workers (``"mp"``), :func:`run_engines` runs in
this process instead — switching is the one line below.
"""

from __future__ import annotations

import gc
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

EXECUTOR = "external_launcher"
#: Bound on one spawned group (start-up, every engine, teardown); a hung rank fails the test instead of hanging it.
TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PAGODA_CPU_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from pagoda.distributed import destroy_model_parallel

    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_model_parallel()


def run_spmd(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = TIMEOUT_S) -> list[Any]:
    """``fn(*args)`` on ``world_size`` spawned ranks (``fn`` importable by name); each rank's return value, by rank.
    A rank's exception (its traceback), a rank that dies, or the timeout fails with an AssertionError."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results), daemon=True)
             for rank in range(world_size)]
    outcome: dict[int, Any] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        while len(outcome) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(outcome))} did not finish "
                                         f"within {timeout_s:.0f} s") from None
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise AssertionError(f"a rank exited with code {dead[0]} before reporting") from None
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
        return [outcome[rank] for rank in range(world_size)]
    finally:
        for proc in procs:
            proc.join(timeout=10)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()


def generate_jobs(jobs: list[dict[str, Any]], parallel: dict[str, Any]) -> list[dict[str, Any]]:
    """Build an engine per job in turn (``job["model"]``, ``job.get("engine")``; ``parallel``: the parallel engine
    arguments, empty for one process) and generate each of ``job["runs"]`` (``(prompts, params)`` pairs; params
    ``"embed"``: embed them); per job: the ``tensor_parallel_size`` its layers were split over and its ``runs``: per
    run, per request, the sampled ``token_ids``, their ``logprobs`` (None unless asked) and the ``text``, or the
    ``embedding``."""
    from pagoda import LLM
    from pagoda.distributed import get_tp_group

    out = []
    for job in jobs:
        engine = dict(dtype="float32", seed=0, kv_cache_memory_bytes=1 << 24, **job.get("engine", {}), **parallel)
        llm = LLM(job["model"], **engine)
        runs = []
        for prompts, params in job["runs"]:
            if params == "embed":
                runs.append([{"embedding": list(o.outputs.embedding)} for o in llm.embed(prompts, use_tqdm=False)])
                continue
            outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            runs.append([{"token_ids": list(o.token_ids), "text": o.text,
                          "logprobs": [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)]
                          if o.logprobs else None} for o in outputs])
        # the group this process's layers were split over: under an executor with its own workers, the config's
        split = get_tp_group().world_size if EXECUTOR == "external_launcher" or not parallel else \
            llm.llm_engine.config.parallel.tensor_parallel_size
        out.append({"tensor_parallel_size": split, "runs": runs})
        llm.llm_engine.executor.shutdown()
        del llm
        gc.collect()
    return out


def run_engines(jobs: list[dict[str, Any]], tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                **parallel: Any) -> list[dict[str, Any]]:
    """:func:`generate_jobs` over ``tensor_parallel_size × pipeline_parallel_size`` ranks with :data:`EXECUTOR`;
    rank 0's results."""
    parallel = dict(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                    distributed_executor_backend=EXECUTOR, **parallel)
    if EXECUTOR != "external_launcher":
        return generate_jobs(jobs, parallel)
    return run_spmd(generate_jobs, jobs, parallel, world_size=tensor_parallel_size * pipeline_parallel_size)[0]
