"""Platform ``example_npu``: a second pretend accelerator (running on the CPU), priority from
``PAGODA_EXAMPLE_NPU_PRIORITY`` (default -20). With ``pagoda-example-accelerator`` installed too, it shows how
several out-of-tree platforms resolve: highest priority wins, ties go to the name that sorts first."""

from __future__ import annotations

import os
from abc import ABCMeta

import torch

from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


class _EnvPriority(ABCMeta):
    @property
    def priority(cls) -> int:
        return int(os.environ.get("PAGODA_EXAMPLE_NPU_PRIORITY") or -20)


class ExampleNpuPlatform(Platform, metaclass=_EnvPriority):
    name = "example_npu"
    device_type = "cpu"
    dispatch_key = "CPU"
    supported_dtypes = (torch.float32,)
    attention_backends = ("TORCH_SDPA",)
    uses_host_memory = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None


@hookimpl
def pagoda_register_platforms():
    return [ExampleNpuPlatform]
