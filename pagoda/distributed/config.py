"""How one engine is spread over processes: tensor × pipeline parallel ranks, and the executor that runs them."""

from __future__ import annotations

import os
from dataclasses import dataclass

EXECUTOR_BACKENDS = ("uni", "mp", "ray", "external_launcher")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    #: uni (in-process), mp (worker processes on this machine), ray (Ray actors, several nodes) or
    #: external_launcher (every rank is a process the user started, e.g. with torchrun, running the same program)
    distributed_executor_backend: str = "uni"
    enable_expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        """Ranks of one engine replica (data parallel replicas are separate engines)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The global rank whose step output the engine reads: the first tensor-parallel rank of the last pipeline
        stage (as vLLM)."""
        return self.world_size - self.tensor_parallel_size

    @classmethod
    def from_engine_args(cls, args) -> ParallelConfig:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(args, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        backend = args.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend: must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {backend!r}")
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if backend is None:
            backend = "uni" if world == 1 else ("ray" if _inside_ray_placement_group() else "mp")
        elif backend == "uni" and world > 1:
            raise ValueError(f"distributed_executor_backend: 'uni' runs one process, but tensor_parallel_size × "
                             f"pipeline_parallel_size is {world}; use 'mp' (one machine) or 'ray'")
        return cls(args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size, backend,
                   bool(getattr(args, "enable_expert_parallel", False)))


def _inside_ray_placement_group() -> bool:
    """Whether this process is a Ray task or actor placed in a placement group (then Ray is the default
    executor, as in vLLM)."""
    if "RAY_ADDRESS" not in os.environ and "ray" not in __import__("sys").modules:
        return False
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return False
    return ray.is_initialized() and get_current_placement_group() is not None
