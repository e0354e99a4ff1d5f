"""The CPU platform (built-in plugin): the platform, its op implementations and its fused decode step.

Everything that touches pagoda's native CPU kernels (``kernels/``) lives in this package; the rest of pagoda
reaches them only through the op registry (:mod:`pagoda.platforms.cpu.ops`) and :meth:`CpuPlatform.fused_decode`.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

from pagoda import envs
from pagoda.platforms.cpu import features
from pagoda.platforms.interface import Platform
from pagoda.plugins.hookspecs import hookimpl


def _cpu_supports_bf16() -> bool:
    flags = features.cpu_flags()
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
    def capabilities(cls) -> frozenset[str]:
        return features.capabilities()

    @classmethod
    def fused_decode(cls, stack, ops, kv_caches):
        from pagoda.platforms.cpu.fused_decode import build_fused_decode

        return build_fused_decode(stack, ops, kv_caches)

    @classmethod
    def default_max_num_batched_tokens(cls, usage_context):
        # A server takes bursts of prompts: with 1024-token steps a burst's prompts finish their prefill eight at a
        # time instead of sixteen, so the mean time to first token drops where prefill is slow (W3 on an AMD EPYC
        # Zen 4: 3.02-3.13 s against 3.25-3.49 s at 2048) while output tokens/s is unchanged. Where prefill's GEMMs
        # run on AMX tiles, a step's fixed costs weigh five times more against its prefill: on a Xeon with AMX,
        # 1024-token steps raised W3's mean TTFT (1.54-1.56 s against 1.20 s) and cost 10-13 % of its output
        # tokens/s. Offline throughput is the same at 1024, 2048 and 4096 on the Zen 4; 2048 keeps GEMMs tall.
        if usage_context == "openai_api_server" and "amx_bf16" not in cls.capabilities():
            return 1024
        return 2048

    @classmethod
    def zeroed_empty(cls, shape, dtype):
        # Anonymous pages are zero-filled by the kernel when first touched: the cache needs no zeroing pass, and a
        # block costs nothing until a request writes it (the engine's own zeroing of fresh blocks took a memset of
        # every block on its first use: the slow steps of a decode run, p99 engine overhead 4.3 -> 1.8 ms at 64
        # requests). Not madvised for huge pages: with the kernel's "madvise" defrag policy the first touch of each
        # 2 MiB then compacted memory synchronously, and W1 lost 9 % on an AMX Xeon.
        numel = math.prod(shape)
        region = mmap.mmap(-1, max(numel * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(region, dtype=dtype, count=numel).view(shape)

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
        features.keep_activation_memory()

    @classmethod
    def describe(cls) -> dict[str, object]:
        from pagoda.platforms.cpu.kernels import cpu

        isa = sorted(f for f in features.capabilities() if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
        lib = cpu.kernels()
        native = (f"unavailable: {cpu.unavailable_reason()}" if lib is None else
                  f"built ({lib.lib._name}), {'with' if lib.has_packed_bf16 else 'without'} the AVX512-BF16 GEMMs")
        facts = {**super().describe(), "cpu": features.cpu_model_name(), "isa": isa, "native_kernels": native}
        refusal = features.amx_refusal()
        if "amx_tile" in features.cpu_flags() and refusal:
            facts["amx"] = f"not usable: {refusal}"
        return facts


@hookimpl
def pagoda_register_platforms():
    return [CpuPlatform]


@hookimpl
def pagoda_register_ops():
    from pagoda.platforms.cpu.lora_ops import CPU_LORA_OP_IMPLS
    from pagoda.platforms.cpu.moe_ops import CPU_MOE_OP_IMPLS
    from pagoda.platforms.cpu.ops import CPU_OP_IMPLS
    from pagoda.platforms.cpu.quant_ops import CPU_QUANT_OP_IMPLS

    return CPU_OP_IMPLS + CPU_QUANT_OP_IMPLS + CPU_MOE_OP_IMPLS + CPU_LORA_OP_IMPLS
