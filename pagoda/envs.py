"""Every environment variable pagoda reads, in one place.

Names follow vLLM's so that a vLLM deployment's environment keeps working. Values are read at call time
(not import time) so tests and launchers can set them late.
"""

from __future__ import annotations

import os


def _get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def plugins_allow_list() -> list[str] | None:
    """VLLM_PLUGINS: comma-separated entry-point names to load; unset means load all."""
    value = os.environ.get("VLLM_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def attention_backend() -> str | None:
    """VLLM_ATTENTION_BACKEND: the attention backend to use instead of the automatic choice."""
    return _get("VLLM_ATTENTION_BACKEND")


def api_key() -> str | None:
    """VLLM_API_KEY: the key every /v1 route of the server requires."""
    return _get("VLLM_API_KEY")


def cpu_kvcache_space_gib() -> float | None:
    """VLLM_CPU_KVCACHE_SPACE: KV-cache size in GiB on the CPU platform."""
    value = _get("VLLM_CPU_KVCACHE_SPACE")
    return float(value) if value is not None else None


def cpu_omp_threads() -> int | None:
    """PAGODA_CPU_THREADS: torch intra-op threads on the CPU platform (default: all cores)."""
    value = _get("PAGODA_CPU_THREADS")
    return int(value) if value is not None else None


def worker_multiproc_method() -> str:
    """VLLM_WORKER_MULTIPROC_METHOD: how the mp executor starts its worker processes (default spawn)."""
    return _get("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def host_ip() -> str | None:
    """VLLM_HOST_IP: this node's IP address, where the ranks meet (one per node with the ray executor)."""
    return _get("VLLM_HOST_IP")


def port() -> int | None:
    """VLLM_PORT: the first port tried for the ranks' rendezvous (unset: any free port)."""
    value = _get("VLLM_PORT")
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"VLLM_PORT: must be a TCP port number, got {value!r}")
    return int(value)


def execute_model_timeout_s() -> float | None:
    """VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: how long a step may wait for its workers before the executor is
    declared dead (default 300; 0 or less: as long as the workers live)."""
    value = _get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "300")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: must be a number of seconds, got {value!r}") from None
    return seconds if seconds > 0 else None


def cpu_kernels_enabled() -> bool:
    """PAGODA_CPU_KERNELS: build and use pagoda's native CPU kernels (default 1; 0 keeps torch's ops)."""
    return _get("PAGODA_CPU_KERNELS", "1") not in ("0", "false", "False")


def op_impl() -> str | None:
    """PAGODA_OP_IMPL: forced op implementations, ``op=impl[|impl...],...`` (``--op-impl`` overrides it per op)."""
    return _get("PAGODA_OP_IMPL")


def cache_root() -> str:
    """PAGODA_CACHE_ROOT: where compiled kernels are kept (default ``~/.cache/pagoda``)."""
    return _get("PAGODA_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")


def cxx_compiler() -> str | None:
    """CXX: the C++ compiler that builds the native CPU kernels (default: the first of c++, g++, clang++)."""
    return _get("CXX")


def logging_level() -> str:
    """VLLM_LOGGING_LEVEL: the log level of the `pagoda` logger."""
    return (_get("VLLM_LOGGING_LEVEL", "INFO") or "INFO").upper()


def hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE: never reach the hub when resolving model ids."""
    return _get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False")


def debug_tracebacks() -> bool:
    """PAGODA_DEBUG: show full tracebacks from the command line instead of a one-line error."""
    return _get("PAGODA_DEBUG", "0") not in ("0", "false", "False")


def triton_interpret() -> bool:
    """TRITON_INTERPRET: Triton's own switch to run kernels in its interpreter (TRITON_ATTN on the CPU, tests)."""
    return _get("TRITON_INTERPRET", "0") == "1"


def openai_api_key() -> str | None:
    """OPENAI_API_KEY: the key ``pagoda bench serve`` sends to the server it loads."""
    return _get("OPENAI_API_KEY")


def allow_runtime_lora_updating() -> bool:
    """VLLM_ALLOW_RUNTIME_LORA_UPDATING: the server offers /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    return (_get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0") or "0").lower() in ("1", "true")


def snapshot(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The variables among ``names`` that are set (for ``pagoda env``)."""
    return {name: os.environ[name] for name in names if name in os.environ}
