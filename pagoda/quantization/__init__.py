"""Quantization methods: how weights are stored and multiplied."""

from pagoda.quantization.interface import CheckpointFormat, EmbeddingMethod, LinearMethod, QuantizationConfig

__all__ = ["CheckpointFormat", "EmbeddingMethod", "LinearMethod", "QuantizationConfig"]
