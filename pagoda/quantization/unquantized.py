"""Plain dense weights in the model dtype (built-in plugin).

The arithmetic is the ``linear_dense`` op's: after loading, on the weight's device, the op's chosen
implementation prepares its form of each weight (a repacked copy for pagoda's CPU GEMMs, oneDNN's blocked layout
on AMX CPUs, the parameter itself for the torch reference) and every call multiplies by that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.models.interface import LinearKernel
from pagoda.ops import current_ops
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _sharded_loader(layer: nn.Module, output_sizes: list[int], is_bias: bool = False):
    """Loads a full checkpoint tensor (or one shard of a merged layer) into this rank's part of the parameter
    (``output_sizes``: the rank's shard sizes; ``layer.partition`` narrows the checkpoint tensor to them)."""
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
    partition = getattr(layer, "partition", None)

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if partition is not None and not partition.is_whole:
            loaded = (partition.narrow_bias(loaded, shard_id) if is_bias
                      else partition.narrow(loaded, shard_id, out_dim=0, in_dim=1))
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        target = param.data.narrow(0, offsets[shard_id], output_sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for shard {shard_id}: parameter slice {tuple(target.shape)} vs "
                             f"checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)

    return load


def _vocab_loader(layer: nn.Module):
    """Loads the full checkpoint table into this rank's rows (``layer.vocab_partition``; zero-padded)."""
    partition = getattr(layer, "vocab_partition", None)
    if partition is None or partition.is_whole:
        return default_weight_loader

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        default_weight_loader(param, partition.narrow(loaded))

    return load


def _prepare(layer: nn.Module, bias: torch.Tensor | None, lm_head: bool = False) -> None:
    """Hand the loaded weight to the ``linear_dense`` op (as an LM head's, with ``lm_head``); drop the parameters
    when the op made its own copy."""
    op = current_ops().linear_dense
    layer.dense_op = op
    layer.dense_handle = (op.prepare_lm_head if lm_head else op.prepare)(layer.weight, bias)
    if not op.keeps_weight:
        layer.weight = None
        if bias is not None:
            layer.bias = None


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = _sharded_loader(layer, output_sizes)
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype), requires_grad=False)
            b.weight_loader = _sharded_loader(layer, output_sizes, is_bias=True)
            layer.register_parameter("bias", b)
        else:
            layer.bias = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _prepare(layer, layer.bias)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.dense_op.apply(layer.dense_handle, x)

    def kernel(self, layer: nn.Module) -> LinearKernel | None:
        return LinearKernel(layer.dense_op, layer.dense_handle)


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    """An embedding table; when it also serves as the LM head (``layer.serves_logits``), the ``linear_dense`` op
    holds it and serves the lookups too."""

    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = _vocab_loader(layer)
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "serves_logits", False):
            _prepare(layer, None, lm_head=True)

    def embed(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        if hasattr(layer, "dense_handle"):
            return layer.dense_op.rows(layer.dense_handle, token_ids)
        return torch.nn.functional.embedding(token_ids, layer.weight)

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.dense_op.logits(layer.dense_handle, hidden)

    def greedy(self, layer: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return layer.dense_op.greedy(layer.dense_handle, hidden, allowed)


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
