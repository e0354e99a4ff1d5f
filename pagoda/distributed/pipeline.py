"""Pipeline parallelism: which decoder layers each stage owns, and what stages hand each other.

The layers are cut into ``pipeline_parallel_size`` consecutive slices. ``VLLM_PP_LAYER_PARTITION`` ("4,4", one
count per stage, summing to the layer count) fixes the cut; otherwise the layers are spread evenly and, as in vLLM,
the remainder goes one layer each to the stages just before the last (the last stage also runs the final norm and
the LM head, the first the embedding).

A stage builds only its own layers; every other position of the layer list holds a :class:`PPMissingLayer` (no
weights), so layer indices and checkpoint names stay those of the whole model. Between stages travel
:class:`IntermediateTensors`: the residual stream as the previous stage left it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pagoda.distributed.parallel_state import get_pp_group

PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"


def layer_partition(num_layers: int, pp_size: int) -> list[int]:
    """How many layers each stage owns, in stage order."""
    text = os.environ.get(PARTITION_ENV, "").strip()
    if text:
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"{PARTITION_ENV}={text!r}: must be comma-separated layer counts, one per pipeline "
                             f"stage (e.g. {_even_text(num_layers, pp_size)!r})") from None
        if len(counts) != pp_size or sum(counts) != num_layers or min(counts) < 0:
            raise ValueError(f"{PARTITION_ENV}={text!r}: must be {pp_size} non-negative layer counts (one per "
                             f"pipeline stage) summing to the model's {num_layers} layers, e.g. "
                             f"{_even_text(num_layers, pp_size)!r}")
        return counts
    return even_partition(num_layers, pp_size)


def even_partition(num_layers: int, pp_size: int) -> list[int]:
    """vLLM's default split: ``num_layers // pp_size`` each, one more for each of the ``num_layers % pp_size``
    stages just before the last (the last stage already carries the LM head)."""
    counts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        counts[-i] += 1
    return counts


def _even_text(num_layers: int, pp_size: int) -> str:
    return ",".join(map(str, even_partition(num_layers, pp_size)))


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``[start, end)`` of the layers stage ``pp_rank`` of ``pp_size`` owns."""
    counts = layer_partition(num_layers, pp_size)
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


def stage_layer_range(num_layers: int) -> tuple[int, int]:
    """``[start, end)`` of this process's layers (all of them without pipeline parallelism)."""
    pp = get_pp_group()
    if pp.world_size == 1:
        return 0, num_layers
    return get_pp_indices(num_layers, pp.rank_in_group, pp.world_size)


class PPMissingLayer(nn.Identity):
    """Stands where a module lives on another pipeline stage: it holds no weights, and is never called."""


def make_layers(num_layers: int, build: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """The decoder's layer list: ``build(i)`` for this stage's layers, :class:`PPMissingLayer` for the rest.
    Returns ``(start, end, layers)``."""
    start, end = stage_layer_range(num_layers)
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def is_first_stage() -> bool:
    return get_pp_group().is_first_rank


def is_last_stage() -> bool:
    return get_pp_group().is_last_rank


def first_stage_module(build: Callable[[], nn.Module], also_on_last: bool = False) -> nn.Module:
    """A first-stage module (the token embedding; ``also_on_last``: also the last stage's, as the LM head it is
    tied to), or a placeholder on the other stages."""
    pp = get_pp_group()
    return build() if pp.is_first_rank or (also_on_last and pp.is_last_rank) else PPMissingLayer()


def last_stage_module(build: Callable[[], nn.Module | None]) -> nn.Module | None:
    """A last-stage module (final norm, LM head), or a placeholder on the other stages."""
    return build() if get_pp_group().is_last_rank else PPMissingLayer()


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes (``"model.layers.3."``) of the modules another stage holds: their checkpoint tensors are
    skipped while loading. Empty without pipeline parallelism."""
    if get_pp_group().world_size == 1:
        return ()
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, PPMissingLayer))


class IntermediateTensors:
    """What a non-last stage hands the next one: named tensors (``hidden_states``, and ``residual`` for models
    whose residual stream is added by the next norm), each ``[num_tokens, hidden]``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.tensors.get(key, default)

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, IntermediateTensors) and self.tensors.keys() == other.tensors.keys()
                and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items()))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"IntermediateTensors({shapes})"


def stage_outputs(hidden: torch.Tensor, residual: torch.Tensor | None) -> IntermediateTensors:
    """A non-last stage's result: the hidden states and (where the model keeps one apart) the residual."""
    tensors = {"hidden_states": hidden}
    if residual is not None:
        tensors["residual"] = residual
    return IntermediateTensors(tensors)


def stage_inputs(intermediate: IntermediateTensors | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A non-first stage's ``(hidden, residual)`` from the previous stage's tensors."""
    if intermediate is None:
        raise ValueError("a pipeline stage after the first needs the previous stage's intermediate_tensors")
    return intermediate["hidden_states"], intermediate.get("residual")
