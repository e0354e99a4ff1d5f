"""The executor: how the engine reaches its workers (one per rank).

The engine schedules; the executor hands each step's :class:`~pagoda.core.scheduler.SchedulerOutput` to every
worker and returns the sampled result of the rank that produces it. Implementations: ``uni`` (one worker in the
engine's process — no added cost per step), ``external_launcher`` (the same, in each process of an SPMD launch
such as torchrun), ``mp`` (worker processes on this machine) and ``ray`` (Ray actors, across nodes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pagoda.core.config import EngineConfig
from pagoda.core.model_runner import ModelRunner, RunnerOutput
from pagoda.core.scheduler import SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A worker died or stopped answering: the engine can't run another step."""


class Executor(ABC):
    #: The ``--distributed-executor-backend`` name.
    name: ClassVar[str]

    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        self.config = config
        self._init_workers(tokenizer)

    @abstractmethod
    def _init_workers(self, tokenizer: Any) -> None:
        """Start the workers, and have each one set up its device and load its part of the model."""

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Call ``Worker.method(*args, **kwargs)`` on every worker; their results in rank order."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step on every worker; the output of the rank that samples."""

    def determine_num_kv_blocks(self) -> int:
        """KV-cache blocks every rank can hold (the smallest of the ranks' figures)."""
        return min(self.collective_rpc("available_kv_blocks"))

    def initialize_cache(self, num_blocks: int, eos_token_ids: set[int]) -> None:
        self.collective_rpc("initialize_cache", (num_blocks, eos_token_ids))

    @property
    def driver_runner(self) -> ModelRunner | None:
        """The model runner when it lives in the engine's process (``uni``, ``external_launcher``), else None."""
        return None

    def check_health(self) -> None:
        """Raise :class:`ExecutorDeadError` if a worker is gone."""

    def shutdown(self) -> None:
        """Stop the workers (idempotent)."""


def executor_class(backend: str) -> type[Executor]:
    """The executor implementing ``--distributed-executor-backend backend``."""
    if backend in ("uni", "external_launcher"):
        from pagoda.executor.uni import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from pagoda.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor
    if backend == "ray":
        from pagoda.executor.ray_executor import RayExecutor

        return RayExecutor
    raise ValueError(f"distributed_executor_backend: unknown backend {backend!r}")
