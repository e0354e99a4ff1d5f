"""A rank's share of a layer's weights under tensor parallelism.

Layers hold only their rank's part of each weight, so every loader narrows the full checkpoint tensor it is given
to that part: :meth:`LinearPartition.narrow` for linear layers (any stored layout: a tensor dimension may count
features one to one, or packed codes / quantization groups of several features per element), and
:meth:`VocabPartition.narrow` for embedding tables and LM heads. With one rank both are identities that cost
nothing.

- **column-parallel** (``qkv_proj``, ``gate_up_proj``, up projections): each output shard of a merged layer is
  split on its own; a shard made of fewer indivisible units (KV heads) than ranks is replicated instead — rank
  ``r`` keeps unit ``r // (ranks // units)`` — as vLLM does for KV heads.
- **row-parallel** (``o_proj``, ``down_proj``): the input features are split; the partial products are summed over
  the ranks (the layer's all-reduce) and the bias is added once — only rank 0 keeps it.
- **replicated**: every rank holds the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.utils import cdiv

Slice = tuple[int, int]  # (start, size)


@dataclass(frozen=True)
class LinearPartition:
    kind: str  # "column", "row" or "replicated"
    tp_rank: int
    tp_size: int
    input_size: int
    output_sizes: tuple[int, ...]
    output_slices: tuple[Slice, ...]  # per output shard: this rank's (start, size) within the shard
    input_slice: Slice  # this rank's (start, size) of the input features
    prefix: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def replicated(cls, input_size: int, output_sizes: list[int], prefix: str = "") -> LinearPartition:
        return cls("replicated", 0, 1, input_size, tuple(output_sizes), tuple((0, s) for s in output_sizes),
                   (0, input_size), prefix)

    @classmethod
    def column(cls, input_size: int, output_sizes: list[int], tp_rank: int, tp_size: int,
               units: list[int] | None = None, prefix: str = "") -> LinearPartition:
        """Split each output shard over the ranks; ``units[i]`` is shard ``i``'s indivisible unit (a head's
        size for q/k/v; default 1)."""
        if tp_size == 1:
            return cls.replicated(input_size, output_sizes, prefix)
        slices = []
        for index, size in enumerate(output_sizes):
            unit = units[index] if units else 1
            count = size // unit
            if count * unit != size:
                raise ValueError(f"{prefix}: output shard {index} ({size}) is not a whole number of units of {unit}")
            if count % tp_size == 0:
                part = size // tp_size
                slices.append((tp_rank * part, part))
            elif tp_size % count == 0:  # fewer units than ranks: each unit on tp_size // count ranks
                slices.append((tp_rank // (tp_size // count) * unit, unit))
            else:
                raise ValueError(f"{prefix}: output shard {index} has {count} units of {unit}, which "
                                 f"tensor_parallel_size {tp_size} neither divides nor is a multiple of")
        return cls("column", tp_rank, tp_size, input_size, tuple(output_sizes), tuple(slices), (0, input_size),
                   prefix)

    @classmethod
    def row(cls, input_size: int, output_sizes: list[int], tp_rank: int, tp_size: int,
            prefix: str = "") -> LinearPartition:
        """Split the input features over the ranks."""
        if tp_size == 1:
            return cls.replicated(input_size, output_sizes, prefix)
        if input_size % tp_size:
            raise ValueError(f"{prefix}: input size {input_size} is not divisible by tensor_parallel_size {tp_size}")
        part = input_size // tp_size
        return cls("row", tp_rank, tp_size, input_size, tuple(output_sizes), tuple((0, s) for s in output_sizes),
                   (tp_rank * part, part), prefix)

    # ------------------------------------------------------------------ this rank's sizes
    @property
    def is_whole(self) -> bool:
        """Whether this rank holds the whole layer (no narrowing at all)."""
        return self.kind == "replicated"

    @property
    def local_output_sizes(self) -> list[int]:
        return [size for _, size in self.output_slices]

    @property
    def local_input_size(self) -> int:
        return self.input_slice[1]

    @property
    def reduces_output(self) -> bool:
        """Whether the layer's outputs are partial sums to add up over the ranks."""
        return self.kind == "row"

    # ------------------------------------------------------------------ narrowing checkpoint tensors
    def narrow(self, tensor: torch.Tensor, shard: int | None, out_dim: int | None, in_dim: int | None,
               out_unit: int = 1, in_unit: int = 1, name: str = "weight") -> torch.Tensor:
        """This rank's part of a full checkpoint tensor of output shard ``shard`` (``None``: all the layer's
        shards, stored fused along ``out_dim``).

        ``out_dim`` / ``in_dim``: the tensor dimension that runs over output / input features (None: none does,
        e.g. a per-tensor scale). ``out_unit`` / ``in_unit``: features per element along that dimension (8 for
        int32-packed 4-bit codes, the group size for per-group scales). A slice that doesn't fall on whole
        elements is an error naming the layer and tensor."""
        if self.is_whole:
            return tensor
        if out_dim is not None and self.kind == "column":
            if shard is None and len(self.output_sizes) > 1:
                pieces, offset = [], 0
                for index, size in enumerate(self.output_sizes):
                    full = tensor.narrow(out_dim, offset // out_unit, size // out_unit)
                    pieces.append(self._narrow_dim(full, out_dim, self.output_slices[index], out_unit, name))
                    offset += size
                tensor = torch.cat(pieces, dim=out_dim)
            else:
                tensor = self._narrow_dim(tensor, out_dim, self.output_slices[shard or 0], out_unit, name)
        if in_dim is not None and self.kind == "row":
            tensor = self._narrow_dim(tensor, in_dim, self.input_slice, in_unit, name)
        return tensor

    def narrow_bias(self, bias: torch.Tensor, shard: int | None) -> torch.Tensor:
        """This rank's part of a bias: its outputs' entries (column), the whole on rank 0 and zeros elsewhere
        (row, so the sum over the ranks adds it once)."""
        if self.kind == "row":
            return bias if self.tp_rank == 0 else torch.zeros_like(bias)
        return self.narrow(bias, shard, 0, None)

    def _narrow_dim(self, tensor: torch.Tensor, dim: int, piece: Slice, unit: int, name: str) -> torch.Tensor:
        start, size = piece
        if start % unit or size % unit:
            raise ValueError(f"{self.prefix}.{name}: this rank's features [{start}, {start + size}) don't fall on "
                             f"whole elements of {unit} features; tensor_parallel_size {self.tp_size} can't split it")
        return tensor.narrow(dim, start // unit, size // unit)


@dataclass(frozen=True)
class VocabPartition:
    """A rank's rows of a vocabulary-parallel embedding table or LM head: ``[start, start + rows)`` of
    ``vocab_size``, every rank holding ``rows = ceil(vocab_size / tp_size)`` (the last one padded with zero rows,
    whose logits are dropped after gathering)."""

    vocab_size: int
    tp_rank: int
    tp_size: int

    @property
    def rows(self) -> int:
        return cdiv(self.vocab_size, self.tp_size)

    @property
    def start(self) -> int:
        return self.tp_rank * self.rows

    @property
    def num_real_rows(self) -> int:
        """Rows of this rank that are real tokens (the rest is padding)."""
        return max(0, min(self.rows, self.vocab_size - self.start))

    @property
    def is_whole(self) -> bool:
        return self.tp_size == 1

    def narrow(self, tensor: torch.Tensor, dim: int = 0, unit: int = 1, name: str = "table") -> torch.Tensor:
        """This rank's rows of a full table (``dim`` runs over tokens; ``unit`` tokens per element, e.g. rows packed
        into int32 words), zero-padded to :attr:`rows`. Rows that don't fall on whole elements are an error naming
        ``name``."""
        if self.is_whole:
            return tensor
        if self.start % unit or self.rows % unit:
            raise ValueError(f"{name}: this rank's vocabulary rows [{self.start}, {self.start + self.rows}) don't "
                             f"fall on whole elements of {unit} rows; tensor_parallel_size {self.tp_size} can't "
                             "split it")
        part = tensor.narrow(dim, self.start // unit, cdiv(self.num_real_rows, unit))
        missing = cdiv(self.rows, unit) - part.shape[dim]
        if missing:
            pad_shape = list(part.shape)
            pad_shape[dim] = missing
            part = torch.cat([part, torch.zeros(pad_shape, dtype=part.dtype, device=part.device)], dim=dim)
        return part
