"""What the out-of-process executors (``mp``, ``ray``) share: the features they refuse, each worker's thread count,
and the worker-side reply to a call (its result, or the failure with the worker's traceback).

The model runner lives in the workers there, so the engine's process has no runner to ask. Pooling models (their
request checks call the model's pooler), LoRA adapters (loaded into the runner's manager as requests arrive) and
speculative decoding (its drafter and stats live in the runner) are refused at start-up with a ``ValueError``
naming both settings, rather than failing on the first request.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from pagoda.core.config import EngineConfig


def check_supported(config: EngineConfig) -> None:
    """``ValueError`` for a feature that needs the model runner in the engine's process."""
    parallel = config.parallel
    backend = parallel.distributed_executor_backend
    where = (f"with distributed_executor_backend {backend!r} (tensor_parallel_size {parallel.tensor_parallel_size}, "
             f"pipeline_parallel_size {parallel.pipeline_parallel_size})")
    if config.model.task != "generate":
        raise ValueError(f"task {config.model.task!r}: pooling models are not supported {where} yet; serve them "
                         "with tensor_parallel_size 1 and pipeline_parallel_size 1")
    if config.lora is not None:
        raise ValueError(f"enable_lora: LoRA adapters are not supported {where} yet")
    if config.speculative_config is not None:
        raise ValueError(f"speculative_config: speculative decoding is not supported {where} yet")


def worker_threads(world_size: int) -> int:
    """Torch threads per worker: ``PAGODA_CPU_THREADS`` if set, else this process's cores shared evenly."""
    from pagoda import envs

    configured = envs.cpu_omp_threads()
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size)


def worker_thread_env(world_size: int) -> dict[str, str]:
    """The environment that sets a worker's thread count; it must be in place before the worker imports torch."""
    threads = str(worker_threads(world_size))
    return {"PAGODA_CPU_THREADS": threads, "OMP_NUM_THREADS": threads}


class WorkerFailure:
    """A call that raised in a worker: which rank and method, the traceback text, and the exception itself when
    it survives pickling (so an RPC's ``ValueError`` reaches the caller as a ``ValueError``)."""

    def __init__(self, rank: int, method: str, exc: BaseException) -> None:
        self.rank = rank
        self.method = method
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.exc: BaseException | None = exc
        try:
            import pickle

            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text only
            self.exc = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["exc"] is not None:
            state["exc"] = state["exc"].with_traceback(None)
        return state

    def describe(self) -> str:
        return f"worker rank {self.rank} failed in {self.method}:\n{self.traceback}"

    def as_rpc_error(self) -> BaseException:
        """The exception to raise in the engine's process for a failed call (not a step)."""
        if self.exc is not None:
            exc = self.exc
            exc.add_note(f"(raised in worker rank {self.rank}, {self.method}:\n{self.traceback})")
            return exc
        return RuntimeError(self.describe())
