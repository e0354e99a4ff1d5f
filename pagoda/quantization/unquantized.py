"""Plain dense weights in the model dtype (built-in plugin)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import cpu_ops
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _sharded_loader(output_sizes: list[int]):
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        target = param.data.narrow(0, offsets[shard_id], output_sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for shard {shard_id}: parameter slice {tuple(target.shape)} vs "
                             f"checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)

    return load


def _packed(layer: nn.Module, x: torch.Tensor) -> cpu_ops.PackedWeight | None:
    """The layer's weight packed for the native bf16 CPU GEMM, packing it on first use.

    Packing waits for the first forward because only then is the weight where it will run (the loader processes
    weights before the model moves to its device). The plain weight is dropped once packed, so the packed copy
    costs no memory.
    """
    packed = getattr(layer, "packed_weight", None)
    if packed is None and x.device.type == "cpu" and x.dtype == torch.bfloat16 and cpu_ops.can_pack(layer.weight):
        packed = layer.packed_weight = cpu_ops.pack_weight(layer.weight, getattr(layer, "bias", None))
        layer.weight = None
        if getattr(layer, "bias", None) is not None:
            layer.bias = None
    return packed


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = _sharded_loader(output_sizes)
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype), requires_grad=False)
            b.weight_loader = _sharded_loader(output_sizes)
            layer.register_parameter("bias", b)
        else:
            layer.bias = None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        packed = _packed(layer, x)
        if packed is not None:
            return cpu_ops.packed_linear(x, packed)
        return F.linear(x, layer.weight, layer.bias)


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = default_weight_loader
        layer.register_parameter("weight", weight)

    def embed(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        packed = getattr(layer, "packed_weight", None)
        if packed is not None:  # an LM head packed for the logits also serves the lookups
            return packed.rows(token_ids)
        return F.embedding(token_ids, layer.weight)

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        packed = _packed(layer, hidden)
        if packed is not None:
            return cpu_ops.packed_linear(hidden, packed, float_output=True)
        return F.linear(hidden, layer.weight).float()

    def greedy(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        packed = _packed(layer, hidden)  # an embedding table has no bias
        return cpu_ops.linear_argmax(hidden, packed) if packed is not None else None


class UnquantizedConfig(QuantizationConfig):
    name = "none"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnquantizedConfig:
        return cls()

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


@hookimpl
def pagoda_register_quantization_methods():
    return [UnquantizedConfig]
