"""The CUDA platform (built-in plugin): NVIDIA GPUs through a CUDA build of torch."""

from __future__ import annotations

import torch

from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


#: Architecture levels an op may require: ``sm_XY`` in an implementation's ``requires`` means compute capability
#: X.Y or newer.
SM_LEVELS = (70, 75, 80, 86, 89, 90, 100, 120)


def sm_capabilities(level: int) -> frozenset[str]:
    """What a GPU of compute capability ``level`` (``10 * major + minor``) reports: its own ``sm_XY`` and every
    level of :data:`SM_LEVELS` up to it."""
    return frozenset({f"sm_{level}"} | {f"sm_{v}" for v in SM_LEVELS if v <= level})


def torch_build() -> str:
    """What this torch was built for, for reasons shown to users (e.g. ``torch 2.13.0+cpu (CPU only)``)."""
    if torch.version.hip:
        kind = f"ROCm {torch.version.hip}"
    elif torch.version.cuda:
        kind = f"CUDA {torch.version.cuda}"
    else:
        kind = "CPU only" if not getattr(torch.version, "xpu", None) else f"XPU {torch.version.xpu}"
    return f"torch {torch.__version__} ({kind})"


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"
    # Above the host platforms (cpu is 0) so ``--device auto`` prefers an accelerator when one is present.
    priority = 100
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    attention_backends = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "XFORMERS", "TORCH_SDPA")
    supported_quantization = None
    dist_backend = "nccl"
    ray_device_key = "GPU"
    uses_host_memory = False
    device_control_env_var = "CUDA_VISIBLE_DEVICES"  # HIP honours it too (ROCm inherits it)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip:
            return f"{torch_build()} targets AMD GPUs; use the rocm platform"
        if not torch.version.cuda:
            return (f"{torch_build()} has no CUDA support; install a CUDA build of torch "
                    f"(https://pytorch.org/get-started/locally/) and pip install pagoda-llm[cuda]")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return f"no CUDA device found ({torch_build()}; check the driver and CUDA_VISIBLE_DEVICES)"
        return None

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        if cls.unavailable_reason() is not None:
            return frozenset()
        major, minor = torch.cuda.get_device_capability(0)
        return sm_capabilities(10 * major + minor)

    @classmethod
    def default_dtype(cls, model_dtype: torch.dtype) -> torch.dtype:
        # bfloat16 needs compute capability 8.0+ (Ampere); older GPUs fall back to float16.
        if model_dtype in (torch.float32, torch.bfloat16) and not torch.cuda.is_bf16_supported():
            return torch.float16
        return super().default_dtype(model_dtype)

    @classmethod
    def total_memory_bytes(cls) -> int:
        return torch.cuda.mem_get_info()[1]

    @classmethod
    def free_memory_bytes(cls) -> int:
        return torch.cuda.mem_get_info()[0]

    @classmethod
    def device_count(cls) -> int:
        return torch.cuda.device_count()

    @classmethod
    def set_device(cls, index: int = 0) -> None:
        torch.cuda.set_device(index)

    @classmethod
    def seed_everything(cls, seed: int | None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
            torch.cuda.manual_seed_all(seed)

    @classmethod
    def synchronize(cls) -> None:
        torch.cuda.synchronize()

    @classmethod
    def describe(cls) -> dict[str, object]:
        facts = super().describe()
        if cls.unavailable_reason() is None:
            props = torch.cuda.get_device_properties(0)
            facts.update(device_name=props.name, device_count=torch.cuda.device_count(),
                         capability=f"{props.major}.{props.minor}",
                         total_memory_gib=round(props.total_memory / 2**30, 1))
        return facts


@hookimpl
def pagoda_register_platforms():
    return [CudaPlatform]


@hookimpl
def pagoda_register_ops():
    # The module imports triton only if it is installed and jits its kernels on first use: registering is cheap.
    from pagoda.platforms.cuda_codebook_ops import CUDA_CODEBOOK_OP_IMPLS
    from pagoda.platforms.cuda_int8_ops import CUDA_INT8_OP_IMPLS
    from pagoda.platforms.cuda_quant_ops import CUDA_QUANT_OP_IMPLS

    return CUDA_QUANT_OP_IMPLS + CUDA_INT8_OP_IMPLS + CUDA_CODEBOOK_OP_IMPLS
