"""Loading a rank's part of quantized checkpoint tensors under tensor parallelism.

Each quantized format describes, per checkpoint tensor of a linear layer, which of its dimensions runs over the
layer's output features and which over its input features, and how many features one element covers there
(:class:`TensorLayout`: 8 for int32 words of 4-bit codes, the group size for per-group scales, 128 for FP8 block
scales). The checkpoint-linear loader narrows every tensor through the layer's
:class:`~pagoda.distributed.partition.LinearPartition` before keeping it, so a rank only ever holds its part; a
slice that cuts an element (a packed word, a quantization group, a block) is an error naming the layer, the tensor
and the tensor-parallel size. Tensors that run over neither (per-tensor scales, codebooks) are kept whole.

LM heads stored as quantized linear layers (GPTQ's ``lm_head``) are vocabulary-parallel: :class:`VocabRows`
narrows their output rows with the layer's :class:`~pagoda.distributed.partition.VocabPartition`, zero-padding the
last rank to the same number of rows.

Act-order (GPTQ ``desc_act``) layers split on their inputs keep the full per-group scales, since a rank's inputs
belong to any group; :func:`regroup_act_order` rearranges the rank's codes into contiguous, padded groups the
compact kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pagoda.distributed.partition import VocabPartition
from pagoda.quantization.int_kernels import Kernel


@dataclass(frozen=True)
class TensorLayout:
    """How a checkpoint tensor runs over the layer's features: ``out_dim`` / ``in_dim`` the dimension over output /
    input features (None: none does), ``out_unit`` / ``in_unit`` features per element along it."""

    out_dim: int | None = None
    out_unit: int = 1
    in_dim: int | None = None
    in_unit: int = 1


#: A tensor every rank keeps whole (a per-tensor scale, a codebook, a stored shape).
WHOLE = TensorLayout()


class VocabRows:
    """A :class:`VocabPartition` seen as a column partition of an LM head's output rows: narrows the dimension
    over output features to the rank's rows (zero-padded on the last rank) and never splits inputs."""

    kind = "column"

    def __init__(self, vocab: VocabPartition, prefix: str):
        self.vocab, self.prefix = vocab, prefix

    @property
    def is_whole(self) -> bool:
        return self.vocab.is_whole

    def narrow(self, tensor: torch.Tensor, shard: int | None, out_dim: int | None, in_dim: int | None,
               out_unit: int = 1, in_unit: int = 1, name: str = "weight") -> torch.Tensor:
        if self.is_whole or out_dim is None:
            return tensor
        return self.vocab.narrow(tensor, out_dim, out_unit, f"{self.prefix}.{name}")

    def narrow_bias(self, bias: torch.Tensor, shard: int | None) -> torch.Tensor:
        return self.narrow(bias, shard, 0, None)


def layer_partition(layer: Any, prefix: str = "") -> Any | None:
    """How the layer's checkpoint tensors are narrowed to this rank: its linear partition, its vocabulary rows
    (a quantized LM head), or None when it holds them whole."""
    partition = getattr(layer, "partition", None)
    if partition is None:
        vocab = getattr(layer, "vocab_partition", None)
        partition = VocabRows(vocab, prefix) if vocab is not None else None
    if partition is None or partition.is_whole:
        return None
    return partition


def narrow_tensor(partition: Any, layout: TensorLayout | None, tensor: torch.Tensor, shard: int | None,
                  prefix: str, name: str) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name`` (of output shard ``shard``; None: all shards, fused), as
    its own copy so the full tensor can be freed."""
    if layout is None:
        raise ValueError(f"{prefix}.{name}: this format has no tensor-parallel layout for the tensor; it can't be "
                         "loaded with tensor_parallel_size > 1")
    part = partition.narrow(tensor, shard, layout.out_dim, layout.in_dim, layout.out_unit, layout.in_unit, name)
    return part if part is tensor else part.clone()


def splits_inputs(layer: Any) -> bool:
    """Whether this rank holds only part of the layer's input features (a row-parallel layer with several ranks)."""
    partition = getattr(layer, "partition", None)
    return partition is not None and partition.kind == "row" and not partition.is_whole


# ---------------------------------------------------------------------------------------------------- act-order
def regroup_act_order(codes: torch.Tensor, g_idx: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """A rank's share of an act-order layer in contiguous groups: ``codes`` [N, K] for the rank's K inputs,
    ``g_idx`` [K] their (global) groups, ``scale`` / ``zero`` [N, G] every group's values.

    The rank holds a varying number of each group's inputs, so its inputs are sorted by group and each group's run
    is padded to whole sub-groups of ``sub`` inputs (32 where the group size allows, for the compact kernels; else
    the group size), one scale per sub-group. Returns the codes [N, K'] in that order, the scales / zeros
    [N, K' / sub], the input order ``perm`` [K'] (index K: a zero input that padding reads) and ``sub``."""
    k = g_idx.numel()
    groups = scale.shape[1]
    sub = 32 if group % 32 == 0 else group
    g_idx = g_idx.to(torch.int64)
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx names groups outside the {groups} of the layer's scales")
    order = torch.argsort(g_idx, stable=True)
    sorted_groups = g_idx[order]
    counts = torch.bincount(g_idx, minlength=groups)
    padded = (counts + sub - 1) // sub * sub
    padded_start = torch.cumsum(padded, 0) - padded
    count_start = torch.cumsum(counts, 0) - counts
    position = padded_start[sorted_groups] + torch.arange(k, device=g_idx.device) - count_start[sorted_groups]
    total = int(padded.sum())
    perm = torch.full((total,), k, dtype=torch.int64, device=g_idx.device)
    perm[position] = order
    out = torch.zeros(codes.shape[0], total, dtype=codes.dtype, device=codes.device)
    out[:, position] = codes[:, order]
    sub_group = torch.repeat_interleave(torch.arange(groups, device=g_idx.device), padded // sub)
    return (out, scale[:, sub_group].contiguous(), None if zero is None else zero[:, sub_group].contiguous(), perm,
            sub)


class PaddedPermutedKernel(Kernel):
    """A kernel over the layer's inputs reordered by ``perm``, where index ``in_features`` reads a zero (the
    padding of :func:`regroup_act_order`)."""

    def __init__(self, inner: Kernel, perm: torch.Tensor, in_features: int):
        self.inner, self.perm = inner, perm
        self.out_features, self.in_features = inner.out_features, in_features

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1)).index_select(-1, self.perm)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.matmul(self._inputs(x))

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.matmul_float(self._inputs(x))

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.perm.numel() * self.perm.element_size()


# ---------------------------------------------------------------------------------------------------- GGUF
def narrow_gguf_rows(partition: Any, data: torch.Tensor, shape: tuple[int, int], block: int, type_size: int,
                     type_name: str, shard: int | None, prefix: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """This rank's part of a GGUF weight stored as rows of quantized blocks (``data`` [rows, bytes_per_row],
    ``shape`` (out, in)): whole rows for column splits, whole blocks of each row for row splits. Returns the
    bytes (a copy) and their logical shape."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, type_size)
    if shape[1] != blocks.shape[1] * block:
        raise ValueError(f"{prefix}: the {type_name} weight's rows hold {blocks.shape[1] * block} values, its shape "
                         f"says {shape[1]}")
    part = partition.narrow(blocks, shard, 0, 1, 1, block, f"weight ({type_name}, blocks of {block} inputs)")
    return part.reshape(part.shape[0], -1).clone(), (part.shape[0], part.shape[1] * block)
