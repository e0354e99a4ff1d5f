"""Quantization method ``example_int8``: per-output-channel symmetric int8 weights, quantized at load time.

The checkpoint is dense. Loading reuses pagoda's dense parameters and loaders unchanged (merged q/k/v and
gate/up shards included); ``process_weights_after_loading`` then replaces each linear layer's ``weight`` with
``qweight`` (int8 ``[out, in]``) and ``scale`` (float32 ``[out]``) such that ``W ~= qweight * scale[:, None]``,
halving (bf16) or quartering (fp32) the weight memory. ``apply`` uses torch's int8 weight-only matmul on the CPU
and dequantizes on other devices. Embeddings stay dense.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (int8 [out, in], float32 scale [out]) with ``weight ~= q * scale[:, None]``."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class ExampleInt8LinearMethod(LinearMethod):
    def __init__(self) -> None:
        self._dense = UnquantizedLinearMethod()

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        # Dense parameters (with their shard-aware loaders) receive the checkpoint; quantized after loading.
        self._dense.create_weights(layer, input_size, output_sizes, bias, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quantize_per_channel(layer.weight.data)
        del layer.weight
        layer.register_buffer("qweight", q)
        layer.register_buffer("scale", scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # x @ qweight.T * scale without materialising a dense copy of the weight.
            out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), layer.qweight,
                                            layer.scale.to(x.dtype)).reshape(*x.shape[:-1], -1)
        else:
            out = F.linear(x, layer.qweight.to(x.dtype)) * layer.scale.to(x.dtype)
        if layer.bias is not None:
            out = out + layer.bias
        return out


class ExampleInt8Config(QuantizationConfig):
    name = "example_int8"
    act_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    platforms = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExampleInt8Config:
        return cls()

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return ExampleInt8LinearMethod()

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()
