"""``uni`` and ``external_launcher``: the one worker of this process, called directly.

``uni`` is the single-process engine. Under ``external_launcher`` every rank is a process started by the user
(torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), each running the same
program with its own engine; identical inputs keep their schedulers in step, as in vLLM's SPMD mode.
"""

from __future__ import annotations

import os
from typing import Any

from pagoda.core.model_runner import ModelRunner, RunnerOutput
from pagoda.core.scheduler import SchedulerOutput
from pagoda.executor.interface import Executor
from pagoda.executor.worker import Worker


class UniProcExecutor(Executor):
    name = "uni"

    def _init_workers(self, tokenizer: Any) -> None:
        rank = local_rank = 0
        if self.config.parallel.distributed_executor_backend == "external_launcher":
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ValueError(f"distributed_executor_backend 'external_launcher' needs {', '.join(missing)} in the "
                                 "environment (as torchrun sets them)")
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            world = int(os.environ["WORLD_SIZE"])
            if world != self.config.parallel.world_size:
                raise ValueError(f"WORLD_SIZE is {world} but tensor_parallel_size × pipeline_parallel_size is "
                                 f"{self.config.parallel.world_size}")
        self.worker = Worker(self.config, rank, local_rank, "env://", tokenizer)
        self.worker.init_device()
        self.worker.load_model()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.worker.runner.execute(sched)

    @property
    def driver_runner(self) -> ModelRunner | None:
        return self.worker.runner
