"""GGUF (llama.cpp's single-file format) as a pagoda quantization plugin.

- :mod:`.reader` — memory-mapped parsing, :class:`GGUFError` for unusable files.
- :mod:`.checkpoint` — :class:`GGUFCheckpoint`: detection, HF config, tokenizer, weights under HF names.
- :mod:`.dequant` — torch dequantization of F32/F16/BF16, Q4_0…Q8_0 and Q2_K…Q6_K.
- :mod:`.kernels` / :mod:`.methods` — compact weights and their matmuls behind the Linear/Embedding methods.

Registered through the ``pagoda.plugins`` entry point ``gguf``.
"""

from __future__ import annotations

from typing import Any

from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.gguf.checkpoint import GGUFCheckpoint, GGUFWeight
from pagoda.quantization.gguf.methods import GGUFEmbeddingMethod, GGUFLinearMethod
from pagoda.quantization.gguf.reader import GGUFError, SUPPORTED_TYPES
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig


class GGUFConfig(QuantizationConfig):
    """Weights as stored in a GGUF file; selected by the file format rather than a ``quantization_config``."""

    name = "gguf"
    # The kernels call torch's CPU int4/int8 weight-only matmuls and keep their tensors outside the module's
    # parameters (they do not follow ``model.to(device)``).
    platforms = ("cpu",)
    checkpoint_format = GGUFCheckpoint
    # 3-D expert stacks are dequantized per expert on load (GGUFCheckpoint.iter_weights): no quantized MoE path yet
    dense_moe_experts = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        return cls()

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(prefix)

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return GGUFEmbeddingMethod(prefix)


@hookimpl
def pagoda_register_quantization_methods():
    return [GGUFConfig]


__all__ = ["GGUFConfig", "GGUFCheckpoint", "GGUFError", "GGUFWeight", "GGUFLinearMethod",
           "GGUFEmbeddingMethod", "SUPPORTED_TYPES"]
