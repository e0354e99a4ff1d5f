"""pagoda: a vLLM-compatible engine for LLM inference and serving."""

from pagoda.version import __version__

# Public names → the module that defines them. Imported lazily so that `import pagoda` (the CLI's --help, plugin
# discovery) doesn't import torch.
_EXPORTS = {
    "LLM": "pagoda.entrypoints.llm",
    "EngineArgs": "pagoda.core.engine_args",
    "SamplingParams": "pagoda.sampling_params",
    "RequestOutputKind": "pagoda.sampling_params",
    "StructuredOutputsParams": "pagoda.sampling_params",
    "PoolingParams": "pagoda.pooling_params",
    "RequestOutput": "pagoda.outputs",
    "CompletionOutput": "pagoda.outputs",
    "PoolingOutput": "pagoda.outputs",
    "PoolingRequestOutput": "pagoda.outputs",
    "EmbeddingOutput": "pagoda.outputs",
    "EmbeddingRequestOutput": "pagoda.outputs",
    "ClassificationOutput": "pagoda.outputs",
    "ClassificationRequestOutput": "pagoda.outputs",
    "ScoringOutput": "pagoda.outputs",
    "ScoringRequestOutput": "pagoda.outputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
