"""Process groups for tensor and pipeline parallelism, on ``torch.distributed``.

The ranks of one engine form a ``pp × tp`` grid laid out as vLLM lays it out: ``arange(world).reshape(pp, tp)``;
a row is a tensor-parallel group (contiguous ranks), a column a pipeline-parallel group (ranks ``tp`` apart).
Every group is created on every rank in the same order, as ``torch.distributed.new_group`` requires.

Layers ask :func:`get_tp_group` / :func:`get_pp_group` while they are built and keep the group they got. Before
:func:`initialize_model_parallel` (one process, the default) both are a one-rank group whose collectives return
their input untouched, so the single-process path pays nothing for being parallel-aware.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelGroup:
    """One process group: ``ranks`` (global ranks, in group order) and this process's place in it.

    ``device_group`` carries tensors with the platform's backend (gloo on the CPU, nccl on CUDA); ``cpu_group`` is
    a gloo group for Python objects (metadata, scheduler outputs). Both are None for a one-rank group."""

    ranks: list[int]
    rank_in_group: int = 0
    device_group: Any = field(default=None, repr=False)
    cpu_group: Any = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """The global rank after this one in the group (wrapping around)."""
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        """The global rank before this one in the group (wrapping around)."""
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    # ------------------------------------------------------------------ collectives on tensors
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the group (in place where the backend allows; use the return value)."""
        if self.world_size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in group order."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send to global rank ``dst`` (which must ``recv`` a tensor of the same shape and dtype)."""
        dist.send(tensor.contiguous(), dst, group=self.device_group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, device: Any = None) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src, group=self.device_group)
        return tensor

    # ------------------------------------------------------------------ Python objects
    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` of the group's ``src``-th rank, on every rank (pickled through the gloo group)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def send_object(self, obj: Any, dst: int) -> None:
        """Send a picklable object to global rank ``dst`` (length first, then the bytes)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst, group=self.cpu_group)
        dist.send(data, dst, group=self.cpu_group)

    def recv_object(self, src: int) -> Any:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.cpu_group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src, group=self.cpu_group)
        return pickle.loads(data.numpy().tobytes())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)


_SINGLE = ParallelGroup([0])
_WORLD: ParallelGroup = _SINGLE
_TP: ParallelGroup = _SINGLE
_PP: ParallelGroup = _SINGLE


def init_distributed_environment(world_size: int, rank: int, init_method: str, backend: str,
                                 timeout_s: float = 120.0) -> None:
    """Join the default process group (once per process)."""
    global _WORLD
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s))
    ranks = list(range(dist.get_world_size()))
    _WORLD = ParallelGroup(ranks, dist.get_rank(), dist.group.WORLD,
                           dist.group.WORLD if backend in ("gloo", "cpu:gloo")
                           else dist.new_group(ranks, backend="gloo"))


def _make_group(rank_lists: list[list[int]], backend: str) -> ParallelGroup:
    """Create every group of ``rank_lists`` (on every rank, in order); return the one holding this rank."""
    mine = None
    rank = dist.get_rank()
    for ranks in rank_lists:
        device_group = dist.new_group(ranks, backend=backend)
        cpu_group = device_group if backend in ("gloo", "cpu:gloo") else dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = ParallelGroup(list(ranks), ranks.index(rank), device_group, cpu_group)
    assert mine is not None
    return mine


def initialize_model_parallel(tensor_parallel_size: int, pipeline_parallel_size: int, backend: str) -> None:
    """Build the tensor- and pipeline-parallel groups over the initialized world."""
    global _TP, _PP
    world = dist.get_world_size()
    if world != tensor_parallel_size * pipeline_parallel_size:
        raise ValueError(f"world size {world} is not tensor_parallel_size ({tensor_parallel_size}) × "
                         f"pipeline_parallel_size ({pipeline_parallel_size})")
    grid = torch.arange(world).reshape(pipeline_parallel_size, tensor_parallel_size)
    _TP = _make_group(grid.tolist(), backend)
    _PP = _make_group(grid.t().tolist(), backend)


def get_world_group() -> ParallelGroup:
    return _WORLD


def get_tp_group() -> ParallelGroup:
    return _TP


def get_pp_group() -> ParallelGroup:
    return _PP


def model_parallel_is_initialized() -> bool:
    return _WORLD is not _SINGLE


def destroy_model_parallel() -> None:
    """Leave every group and the default process group (safe to call when none was joined)."""
    global _WORLD, _TP, _PP
    _WORLD = _TP = _PP = _SINGLE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
