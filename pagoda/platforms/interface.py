"""The Platform interface: everything the engine needs to know about a kind of hardware.

A platform is a class with class-level descriptors and classmethods (no instance state), registered through
the ``pagoda_register_platforms`` hook. The engine resolves one platform per process
(:func:`pagoda.platforms.resolve_platform`) and asks it for the device, dtypes, attention backends in
priority order, the KV-cache budget and device set-up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class Platform(ABC):
    #: Short unique name, used by ``--device`` (e.g. ``"cpu"``, ``"cuda"``).
    name: ClassVar[str]
    #: The torch device type tensors are placed on (``"cpu"``, ``"cuda"``, ``"xla"``, ``"xpu"``).
    device_type: ClassVar[str]
    #: The torch dispatch key of that device (``"CPU"``, ``"CUDA"``, ``"XLA"``, ``"XPU"``).
    dispatch_key: ClassVar[str]
    #: Higher wins when several platforms are available and ``--device`` is ``auto``.
    priority: ClassVar[int] = 0
    #: Dtypes the model may run in, preferred first.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    #: Attention backend names in priority order; the first one whose ``validate`` passes is chosen.
    attention_backends: ClassVar[tuple[str, ...]] = ("TORCH_SDPA",)
    #: Quantization method names this platform can run; ``None`` means "ask the method".
    supported_quantization: ClassVar[tuple[str, ...] | None] = None
    #: torch.distributed backend for tensor/pipeline parallelism.
    dist_backend: ClassVar[str] = "gloo"
    #: The Ray resource one rank reserves with the ``ray`` executor (vLLM's ``ray_device_key``).
    ray_device_key: ClassVar[str] = "CPU"
    #: The KV-cache budget is a fraction of device memory (``gpu_memory_utilization``) on devices with their own
    #: memory, and a size in GiB on host-memory platforms.
    uses_host_memory: ClassVar[bool] = False
    #: The environment variable that limits which devices a process sees (vLLM's name), e.g.
    #: ``CUDA_VISIBLE_DEVICES``: data-parallel replicas each get their own devices through it. ``None`` on the host.
    device_control_env_var: ClassVar[str | None] = None

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` if this platform can run here, otherwise a sentence saying why not (e.g. a missing package
        with the ``pip install pagoda-llm[extra]`` that brings it, or no device found)."""

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def device(cls, index: int = 0) -> torch.device:
        return torch.device(cls.device_type, index) if cls.device_type != "cpu" else torch.device("cpu")

    @classmethod
    def default_dtype(cls, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype ``--dtype auto`` resolves to for a checkpoint stored in ``model_dtype``."""
        if model_dtype == torch.float32 and torch.bfloat16 in cls.supported_dtypes:
            return torch.bfloat16
        return model_dtype if model_dtype in cls.supported_dtypes else cls.supported_dtypes[0]

    @classmethod
    def total_memory_bytes(cls) -> int:
        """Total memory of the device the KV cache lives on."""
        raise NotImplementedError

    @classmethod
    def free_memory_bytes(cls) -> int:
        """Memory of that device not in use right now."""
        raise NotImplementedError

    @classmethod
    def kv_cache_budget_bytes(cls, *, gpu_memory_utilization: float, cpu_kvcache_space_gib: float | None,
                              model_bytes: int) -> int:
        """Bytes to give the KV cache, after the weights (``model_bytes``) are loaded."""
        if cls.uses_host_memory:
            return int((cpu_kvcache_space_gib if cpu_kvcache_space_gib is not None else 4.0) * (1 << 30))
        budget = int(cls.total_memory_bytes() * gpu_memory_utilization) - model_bytes
        return max(budget, 0)

    @classmethod
    def zeroed_empty(cls, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor that reads as zeros without being written up front (memory the OS hands out zero-filled on
        first touch), for the KV cache; ``None`` where the platform has no such memory (the engine then zeroes each
        cache block when it is first used)."""
        return None

    @classmethod
    def default_max_num_batched_tokens(cls, usage_context: str) -> int:
        """The token budget of one engine step when ``max_num_batched_tokens`` is not given. ``usage_context`` is
        ``"llm_class"`` (offline, :class:`pagoda.LLM`) or ``"openai_api_server"`` (``pagoda serve``): as in vLLM,
        a server may prefer smaller steps, so the prompts of a burst finish their prefill in smaller groups."""
        return 2048

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """What op implementations may require of this platform (CPU ISA flags, a GPU's ``sm_XY``, …)."""
        return frozenset()

    @classmethod
    def fused_decode(cls, stack: Any, ops: Any, kv_caches: list[Any]) -> Any | None:
        """A fused decode step for a model's declared layer stack, or ``None`` to decline.

        ``stack`` is the model's :class:`~pagoda.models.interface.DecoderStack` (weights as the chosen ops' handles,
        norms, rotary table), ``ops`` the engine's :class:`~pagoda.ops.OpSet`. The returned object has
        ``applies(metadata, num_tokens)`` and ``run(hidden, positions, metadata) -> (hidden, residual)`` and takes
        the whole layer loop of the steps it applies to — what CUDA-graph capture is on a GPU. When the engine
        serves LoRA adapters, ``stack.lora_step`` holds the step's adapter plan: the fused step must add each
        layer's delta from its slots, or not apply to steps whose plan is set. A platform declines any part of the
        stack it does not compute exactly — the description grows (a kernel's ``input_order``, routed experts'
        ``shared`` expert), and a field it ignores would compute something else. Called once the KV caches and
        adapter slots exist; the default declines. The object may also offer ``profile(on)`` and
        ``take_phase_times() -> {phase: seconds}``, the time each phase of its layer loop took since the last call
        (``pagoda bench step-overhead`` prints them).
        """
        return None

    @classmethod
    def device_count(cls) -> int:
        """Devices of this platform the process sees (the host counts as one)."""
        return 1

    @classmethod
    def set_device(cls, index: int = 0) -> None:
        """Make ``index`` the current device of this process."""

    @classmethod
    def seed_everything(cls, seed: int | None) -> None:
        """Seed every random generator the platform uses."""
        if seed is not None:
            torch.manual_seed(seed)

    @classmethod
    def synchronize(cls) -> None:
        """Wait for queued device work (used by benchmarks)."""

    @classmethod
    def describe(cls) -> dict[str, object]:
        """Facts for ``pagoda env``."""
        return {
            "name": cls.name,
            "device_type": cls.device_type,
            "dispatch_key": cls.dispatch_key,
            "priority": cls.priority,
            "dtypes": [str(d).removeprefix("torch.") for d in cls.supported_dtypes],
            "attention_backends": list(cls.attention_backends),
            "quantization": list(cls.supported_quantization) if cls.supported_quantization is not None else "any",
            "dist_backend": cls.dist_backend,
        }
