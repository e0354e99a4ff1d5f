"""Where data-parallel replicas run: each its own devices, or its share of the host's cores."""

from __future__ import annotations

import os
from typing import Any


def replica_devices(platform: Any, size: int, world_size: int) -> list[dict[str, str]]:
    """The environment giving each of ``size`` replicas its own ``world_size`` devices (vLLM's way: the
    platform's device-control variable, e.g. ``CUDA_VISIBLE_DEVICES``, sliced among them); empty on the host,
    whose cores the replicas share by threads."""
    variable = platform.device_control_env_var
    if variable is None:
        if not platform.uses_host_memory:
            raise ValueError(f"data_parallel_size: the {platform.name} platform can't give each of {size} replicas "
                             "devices of its own (it names no device-control variable); use data_parallel_size 1")
        return [{} for _ in range(size)]
    visible = os.environ.get(variable)
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(platform.device_count())]
    needed = size * world_size
    if len(ids) < needed:
        raise ValueError(f"data_parallel_size: {size} replicas of {world_size} device(s) each need {needed} "
                         f"{platform.name} devices, but {len(ids)} are visible"
                         + (f" ({variable}={visible})" if visible else ""))
    return [{variable: ",".join(ids[i * world_size:(i + 1) * world_size])} for i in range(size)]
