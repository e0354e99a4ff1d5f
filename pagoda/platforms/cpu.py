"""The CPU platform (built-in plugin)."""

from __future__ import annotations

import os

import torch

from pagoda import envs
from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


def _cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"
    priority = 0
    supported_dtypes = ((torch.bfloat16, torch.float32, torch.float16) if _cpu_supports_bf16()
                        else (torch.float32, torch.bfloat16, torch.float16))
    attention_backends = ("TORCH_SDPA", "IPEX")
    dist_backend = "gloo"
    uses_host_memory = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    @classmethod
    def total_memory_bytes(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def free_memory_bytes(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    @classmethod
    def set_device(cls, index: int = 0) -> None:
        threads = envs.cpu_omp_threads()
        if threads:
            torch.set_num_threads(threads)


@hookimpl
def pagoda_register_platforms():
    return [CpuPlatform]
