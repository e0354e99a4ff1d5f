"""Tensor and pipeline parallelism: process groups (``parallel_state``) and their configuration (``config``)."""

from pagoda.distributed.config import EXECUTOR_BACKENDS, ParallelConfig
from pagoda.distributed.parallel_state import (ParallelGroup, destroy_model_parallel, get_pp_group, get_tp_group,
                                               get_world_group, init_distributed_environment,
                                               initialize_model_parallel, model_parallel_is_initialized)

__all__ = ["EXECUTOR_BACKENDS", "ParallelConfig", "ParallelGroup", "destroy_model_parallel", "get_pp_group",
           "get_tp_group", "get_world_group", "init_distributed_environment", "initialize_model_parallel",
           "model_parallel_is_initialized"]
