"""The XPU platform (built-in plugin): Intel GPUs through torch's ``xpu`` device.

torch has shipped the ``xpu`` device natively since 2.4 (an XPU build of torch); intel-extension-for-pytorch
adds the paged-attention kernels of the IPEX attention backend.
"""

from __future__ import annotations

import torch
import torch.distributed

from pagoda.platforms.cuda import torch_build
from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


def _xpu_dist_backend() -> str:
    # torch 2.8+ ships XCCL for XPU; older set-ups use oneCCL's "ccl" from oneccl_bindings_for_pytorch.
    is_xccl = getattr(torch.distributed, "is_xccl_available", None)
    return "xccl" if is_xccl is not None and is_xccl() else "ccl"


class XpuPlatform(Platform):
    name = "xpu"
    device_type = "xpu"
    dispatch_key = "XPU"
    priority = 80
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    attention_backends = ("IPEX", "TORCH_SDPA")
    supported_quantization = None
    dist_backend = _xpu_dist_backend()
    ray_device_key = "GPU"
    uses_host_memory = False
    device_control_env_var = "ZE_AFFINITY_MASK"  # Level Zero's device selection (vLLM's choice for XPU)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not getattr(torch._C, "_has_xpu", False):
            return (f"{torch_build()} has no XPU support; install an XPU build of torch "
                    f"(https://pytorch.org/get-started/locally/) and pip install pagoda-llm[xpu]")
        if not xpu.is_available() or xpu.device_count() == 0:
            return f"no Intel GPU found ({torch_build()}; check the Level Zero driver and ZE_AFFINITY_MASK)"
        return None

    @classmethod
    def total_memory_bytes(cls) -> int:
        return torch.xpu.get_device_properties(torch.xpu.current_device()).total_memory

    @classmethod
    def free_memory_bytes(cls) -> int:
        if hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info()[0]
        # Older torch: what this process has not reserved (other processes' use is invisible here).
        return cls.total_memory_bytes() - torch.xpu.memory_reserved()

    @classmethod
    def device_count(cls) -> int:
        return torch.xpu.device_count()

    @classmethod
    def set_device(cls, index: int = 0) -> None:
        torch.xpu.set_device(index)

    @classmethod
    def seed_everything(cls, seed: int | None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
            torch.xpu.manual_seed_all(seed)

    @classmethod
    def synchronize(cls) -> None:
        torch.xpu.synchronize()


@hookimpl
def pagoda_register_platforms():
    return [XpuPlatform]
