"""pagoda: a vLLM-compatible engine for LLM inference and serving."""

from pagoda.version import __version__

__all__ = ["__version__", "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs"]


def __getattr__(name: str):
    # Lazy so that `import pagoda` (e.g. for the CLI's --help or plugin discovery) doesn't import torch.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from pagoda.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from pagoda import outputs
        return getattr(outputs, name)
    if name == "EngineArgs":
        from pagoda.core.engine_args import EngineArgs
        return EngineArgs
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
