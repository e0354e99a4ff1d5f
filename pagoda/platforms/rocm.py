"""The ROCm platform (built-in plugin): AMD GPUs through a HIP build of torch.

A HIP build of torch exposes AMD GPUs through the ``torch.cuda`` API and the ``cuda`` device type, so this
platform shares the CUDA platform's memory, seed and device calls and differs in its probe and its backends.
"""

from __future__ import annotations

import torch

from pagoda.platforms.cuda import CudaPlatform, torch_build
from pagoda.plugins.hookspecs import hookimpl


class RocmPlatform(CudaPlatform):
    name = "rocm"
    device_type = "cuda"  # HIP devices are torch "cuda" devices
    dispatch_key = "CUDA"
    priority = 100
    attention_backends = ("TRITON_ATTN", "TORCH_SDPA")
    # torch.distributed calls RCCL "nccl" on HIP builds.
    dist_backend = "nccl"
    ray_device_key = "GPU"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.version.hip:
            return (f"{torch_build()} has no ROCm (HIP) support; install a ROCm build of torch "
                    f"(https://pytorch.org/get-started/locally/) and pip install pagoda-llm[rocm]")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return f"no AMD GPU found ({torch_build()}; check HIP_VISIBLE_DEVICES and the amdgpu driver)"
        return None

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        # An AMD GPU's architecture (``gfx942``, …), not a CUDA compute capability.
        if cls.unavailable_reason() is not None:
            return frozenset()
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return frozenset({arch.split(":")[0]}) if arch else frozenset()

    @classmethod
    def describe(cls) -> dict[str, object]:
        facts = super().describe()
        if cls.unavailable_reason() is None:
            facts["gcn_arch"] = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "unknown")
        return facts


@hookimpl
def pagoda_register_platforms():
    return [RocmPlatform]
