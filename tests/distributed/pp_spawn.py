"""Runs a job in the processes of one multi-rank engine, for the pipeline-parallel tests.

Under ``external_launcher`` (SPMD, as torchrun runs it) every rank is a process of its own that builds the same
``LLM`` and runs the same job; identical inputs keep their schedulers in step. With an executor that starts its
own workers (``mp``, ``ray``) only the driver process runs the job. :data:`BACKEND` picks one for every test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.distributed.spmd import run_spmd

#: The executor backend the tests run under (``"mp"`` once that executor exists: the job then runs once).
BACKEND = "external_launcher"


def run_engine_ranks(job: Callable, *args: Any, world_size: int, backend: str = BACKEND,
                     timeout_s: float = 240.0) -> list[Any]:
    """``job(*args)`` in each process of an engine of ``world_size`` ranks (spawned, SPMD); the results by rank
    (one result, from this process, for executors that start their own workers). A rank's exception fails the call
    with its traceback."""
    if backend != "external_launcher":
        return [job(*args)]
    return run_spmd(job, *args, world_size=world_size, timeout_s=timeout_s)
