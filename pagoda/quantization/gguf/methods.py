"""GGUF linear and embedding methods: weights loaded as :class:`GGUFWeight` records, kept compact.

A layer's ``weight`` parameter is a placeholder (an empty uint8 tensor) carrying the ``weight_loader`` the
model's ``load_weights`` calls; the loader keeps the record per shard and ``process_weights_after_loading``
turns the shards into kernels (:mod:`pagoda.quantization.gguf.kernels`). Shards of a merged layer (qkv,
gate_up) that share a type are concatenated into one kernel, since blocks never cross rows; shards of mixed
types (Q4_K_M files store v_proj as Q6_K next to Q4_K q/k) keep one kernel each and their outputs are
concatenated.

Under tensor parallelism each loader narrows the record to the rank's part before keeping it
(:func:`_rank_part`): column-parallel layers keep whole rows (output features), row-parallel ones whole blocks of
every row (a rank's input slice must be a whole number of blocks: 32 values for Q4_0/Q8_0, 256 for the
K-quants), and embedding tables / LM heads the rank's vocabulary rows, the last rank padded with zero blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from torch import nn

from pagoda.models.interface import LinearKernel
from pagoda.ops import current_ops
from pagoda.quantization.gguf.checkpoint import GGUFWeight
from pagoda.quantization.gguf.kernels import (INT4_TYPES, INT8_TYPES, BlockQuantKernel, DenseOpKernel, Kernel,
                                              RawKernel, block_quant_op_for, make_kernel, release_freed_memory)
from pagoda.quantization.checkpoint_linear import apply_kernels, register_bias
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod
from pagoda.quantization.tensor_parallel import layer_partition, narrow_gguf_rows


def _as_record(value: Any, prefix: str) -> GGUFWeight:
    if isinstance(value, GGUFWeight):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point():
        # A dense tensor (a checkpoint mixing formats, or a test): store it as an F32 record.
        data = value.detach().to(torch.float32).contiguous().view(torch.uint8)
        return GGUFWeight(prefix, data, T.F32, (value.shape[0], value.shape[1]))
    raise TypeError(f"{prefix}: GGUF layers load GGUFWeight records or 2-D float tensors, got {type(value).__name__}")


def _rank_part(partition: Any, record: GGUFWeight, shard_id: int | None, prefix: str) -> GGUFWeight:
    """The rank's part of a linear layer's record (``partition`` None: the whole)."""
    if partition is None:
        return record
    block, type_size = GGML_QUANT_SIZES[T(record.ggml_type)]
    data, shape = narrow_gguf_rows(partition, record.data, record.shape, block, type_size, record.type_name,
                                   shard_id, prefix)
    return GGUFWeight(record.name, data, record.ggml_type, shape)


def _placeholder(loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
    param.weight_loader = loader
    return param


class GGUFLinearMethod(LinearMethod):
    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        layer.gguf_input_size = input_size
        layer.gguf_output_sizes = list(output_sizes)
        layer.gguf_shards = [None] * len(output_sizes)
        layer.gguf_kernels = None
        layer.gguf_dtype = params_dtype
        prefix = self.prefix
        partition = layer_partition(layer, prefix)  # None: this rank holds the whole layer

        def load(param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
            record = _rank_part(partition, _as_record(loaded, prefix), shard_id, prefix)
            index = 0 if shard_id is None else shard_id
            expected = (sum(output_sizes), input_size) if shard_id is None else (output_sizes[index], input_size)
            if shard_id is None and len(output_sizes) > 1 and record.shape != expected:
                raise ValueError(f"{prefix}: a merged layer needs a shard_id for {record.name}")
            if record.shape != expected:
                raise ValueError(f"{prefix}: shape mismatch for shard {shard_id}: layer expects {expected}, "
                                 f"{record.name} is {record.shape}")
            if shard_id is None:
                layer.gguf_shards = [record]
            else:
                layer.gguf_shards[index] = record

        layer.register_parameter("weight", _placeholder(load))
        register_bias(layer, output_sizes, bias, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.gguf_kernels is not None:
            return  # already built (apply() builds on first use if the loader did not call this)
        shards = layer.gguf_shards
        missing = [i for i, s in enumerate(shards) if s is None]
        if missing:
            raise ValueError(f"{self.prefix}: no weights were loaded for shard(s) {missing}")
        types = {s.ggml_type for s in shards}
        k = layer.gguf_input_size
        op = current_ops().linear_block_quant
        if len(types) == 1:
            data = shards[0].data if len(shards) == 1 else torch.cat([s.data for s in shards])
            layer.gguf_kernels = [make_kernel(data, shards[0].ggml_type, (data.shape[0], k), layer.gguf_dtype, op,
                                              current_ops().linear_dense)]
        else:
            layer.gguf_kernels = [make_kernel(s.data, s.ggml_type, s.shape, layer.gguf_dtype, op) for s in shards]
        layer.gguf_shards = None  # drop the views of the file
        release_freed_memory()

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.gguf_kernels is None:
            self.process_weights_after_loading(layer)
        return apply_kernels(layer.gguf_kernels, layer.bias, x)

    def kernel(self, layer: nn.Module) -> LinearKernel | None:
        kernels = layer.gguf_kernels
        if kernels is None or len(kernels) != 1 or not isinstance(kernels[0], (BlockQuantKernel, DenseOpKernel)):
            return None
        return LinearKernel(kernels[0].op, kernels[0].handle, layer.bias)


class GGUFEmbeddingMethod(EmbeddingMethod):
    """The table keeps a form that gathers rows cheaply (int8 codes for Q8_0/Q6_K, the ``linear_dense`` op's form
    for float tables, the file's bytes otherwise); ``logits`` uses that same form for Q8_0/Q6_K/float tables, and
    builds an int4 copy on first use for Q4 tables (torch's int4 layout cannot be gathered). On the native bf16 CPU
    kernel one packed form serves both."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        layer.gguf_shape = (num_embeddings, embedding_dim)
        layer.gguf_dtype = params_dtype
        layer.gguf_record = None
        layer.gguf_table = None
        layer.gguf_head = None
        prefix = self.prefix
        vocab = getattr(layer, "vocab_partition", None)  # this rank's rows of the table (set by the layer)

        def load(param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
            record = _as_record(loaded, prefix)
            if vocab is not None and not vocab.is_whole:
                if record.shape[0] != vocab.vocab_size:
                    raise ValueError(f"{prefix}: the table has {vocab.vocab_size} rows, {record.name} has "
                                     f"{record.shape[0]}")
                data = vocab.narrow(record.data, 0).clone()  # zero bytes decode to zero rows (padding)
                record = GGUFWeight(record.name, data, record.ggml_type, (data.shape[0], record.shape[1]))
            if record.shape != layer.gguf_shape:
                raise ValueError(f"{prefix}: shape mismatch: layer expects {layer.gguf_shape}, "
                                 f"{record.name} is {record.shape}")
            layer.gguf_record = record

        layer.register_parameter("weight", _placeholder(load))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.gguf_table is not None:
            return
        record = layer.gguf_record
        if record is None:
            raise ValueError(f"{self.prefix}: no embedding table was loaded")
        op = block_quant_op_for(current_ops().linear_block_quant, record.shape[1], layer.gguf_dtype)
        if record.ggml_type in INT4_TYPES and op is None:
            layer.gguf_table = RawKernel(record.data.clone(), record.ggml_type, record.shape[1])
        else:  # float tables: gathers, logits and argmax on the linear_dense op
            layer.gguf_table = make_kernel(record.data, record.ggml_type, record.shape, layer.gguf_dtype, op,
                                           current_ops().linear_dense, getattr(layer, "serves_logits", False))
        layer.gguf_record = None
        release_freed_memory()

    def _table(self, layer: nn.Module) -> Kernel:
        if layer.gguf_table is None:
            self.process_weights_after_loading(layer)
        return layer.gguf_table

    def embed(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        return self._table(layer).rows(token_ids, layer.gguf_dtype)

    def _head(self, layer: nn.Module) -> Kernel:
        """The kernel that computes logits: the table itself, or an int4 copy built on first use for a Q4 table
        kept as raw bytes."""
        if layer.gguf_head is None:
            table = self._table(layer)
            if isinstance(table, RawKernel) and table.ggml_type in INT4_TYPES:
                layer.gguf_head = make_kernel(table.raw, table.ggml_type, layer.gguf_shape, layer.gguf_dtype,
                                              current_ops().linear_block_quant)
            else:
                layer.gguf_head = table
        return layer.gguf_head

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(layer).matmul_float(hidden)

    def greedy(self, layer: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return self._head(layer).argmax(hidden, allowed)


__all__ = ["GGUFLinearMethod", "GGUFEmbeddingMethod", "INT8_TYPES"]
