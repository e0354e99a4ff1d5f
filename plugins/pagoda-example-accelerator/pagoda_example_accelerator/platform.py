"""Platform ``example``: a pretend accelerator whose "device" is the CPU.

A real accelerator plugin differs in ``device_type``/``dispatch_key`` (its torch device), the probe in
``unavailable_reason`` (is the runtime installed, is a device present) and the memory queries.
"""

from __future__ import annotations

import os
from abc import ABCMeta

import torch

from pagoda.platforms.interface import Platform

DEFAULT_PRIORITY = -10  # below pagoda's cpu platform (0): installing the plugin changes nothing by itself


class _EnvPriority(ABCMeta):
    """Reads the priority from the environment on every access, so tests and users can raise it at run time."""

    @property
    def priority(cls) -> int:
        value = os.environ.get("PAGODA_EXAMPLE_PRIORITY", "")
        try:
            return int(value) if value else DEFAULT_PRIORITY
        except ValueError:
            raise ValueError(f"PAGODA_EXAMPLE_PRIORITY must be an integer, got {value!r}") from None


class ExamplePlatform(Platform, metaclass=_EnvPriority):
    name = "example"
    device_type = "cpu"
    dispatch_key = "CPU"
    supported_dtypes = (torch.float32, torch.bfloat16)
    attention_backends = ("EXAMPLE_ATTN", "TORCH_SDPA")
    supported_quantization = ("none", "example_int8")
    dist_backend = "gloo"
    uses_host_memory = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if os.environ.get("PAGODA_EXAMPLE_UNAVAILABLE") == "1":
            return "the example accelerator is switched off (PAGODA_EXAMPLE_UNAVAILABLE=1)"
        return None

    @classmethod
    def total_memory_bytes(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def free_memory_bytes(cls) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
