"""The TPU platform (built-in plugin): Google TPUs through ``torch_xla``.

``torch_xla`` is imported only inside the probe and the device calls, so that registering this platform on a
machine without it costs nothing.
"""

from __future__ import annotations

import importlib.util

import torch

from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    dispatch_key = "XLA"
    priority = 90
    # TPUs compute natively in bfloat16; float16 is emulated and slow.
    supported_dtypes = (torch.bfloat16, torch.float32)
    attention_backends = ("PALLAS", "TORCH_SDPA")
    supported_quantization = ("none",)
    dist_backend = "xla"
    ray_device_key = "TPU"
    uses_host_memory = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("torch_xla") is None:
            return "torch_xla is not installed: pip install pagoda-llm[tpu]"
        try:
            import torch_xla.runtime as xr

            device_type = xr.device_type()
        except Exception as exc:  # a broken libtpu install shows up here
            return f"torch_xla could not start its runtime: {type(exc).__name__}: {exc}"
        if device_type != "TPU":
            return f"torch_xla found no TPU (its runtime device type is {device_type!r}; set PJRT_DEVICE=TPU)"
        return None

    @classmethod
    def device(cls, index: int = 0) -> torch.device:
        import torch_xla.core.xla_model as xm

        return xm.xla_device(index + 1) if index else xm.xla_device()

    @classmethod
    def _memory_info(cls) -> tuple[int, int]:
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(cls.device())
        # Newer torch_xla reports bytes, older releases kilobytes.
        if "bytes_limit" in info:
            return int(info["bytes_limit"]) - int(info["bytes_used"]), int(info["bytes_limit"])
        return int(info["kb_free"]) * 1024, int(info["kb_total"]) * 1024

    @classmethod
    def total_memory_bytes(cls) -> int:
        return cls._memory_info()[1]

    @classmethod
    def free_memory_bytes(cls) -> int:
        return cls._memory_info()[0]

    @classmethod
    def seed_everything(cls, seed: int | None) -> None:
        if seed is not None:
            import torch_xla.core.xla_model as xm

            torch.manual_seed(seed)
            xm.set_rng_state(seed)

    @classmethod
    def synchronize(cls) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()


@hookimpl
def pagoda_register_platforms():
    return [TpuPlatform]
