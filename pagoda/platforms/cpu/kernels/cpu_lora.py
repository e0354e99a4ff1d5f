"""Tensor-level entry points to the native multi-LoRA kernel (``cpu_lora.h``): adapter slots packed per slot, a
step's tokens grouped by slot, and the delta added in place."""

from __future__ import annotations

import ctypes
from ctypes import c_int64, c_void_p

import torch

from pagoda.platforms.cpu.kernels.cpu import kernels
from pagoda.platforms.cpu.kernels.cpu_ops import packed_elems

MAX_SHARDS = 4  # cpu_lora.h's kLoRAMaxShards


class LoRASlotsStruct(ctypes.Structure):
    _fields_ = [("a", c_void_p), ("a_stride", c_int64), ("b", c_void_p), ("b_stride", c_int64), ("in_", c_int64),
                ("rank", c_int64), ("shards", c_int64), ("out_offset", c_int64 * MAX_SHARDS),
                ("out_size", c_int64 * MAX_SHARDS), ("b_offset", c_int64 * MAX_SHARDS)]


class LoRAGroupsStruct(ctypes.Structure):
    _fields_ = [("order", c_void_p), ("counts", c_void_p), ("num_slots", c_int64)]


def _slot_layout(max_rank: int, input_size: int, output_sizes: list[int]) -> tuple[int, list[int]]:
    """Elements of one slot's packed A, and of each shard's packed B."""
    return (packed_elems(len(output_sizes) * max_rank, input_size), [packed_elems(n, max_rank) for n in output_sizes])


def packed_slots_nbytes(num_slots: int, max_rank: int, input_size: int, output_sizes: list[int]) -> int:
    """Bytes of :class:`PackedLoRASlots` with these arguments."""
    a, b = _slot_layout(max_rank, input_size, output_sizes)
    return num_slots * (a + sum(b)) * 2


class PackedLoRASlots:
    """One layer's adapter slots packed for the kernel: per slot, A [shards * rank, in] (shard i's rows from
    ``i * rank``) and each shard's B_i [out_i, rank], every one zero-padded to ``rank``."""

    def __init__(self, num_slots: int, max_rank: int, input_size: int, output_sizes: list[int]) -> None:
        if len(output_sizes) > MAX_SHARDS:
            raise ValueError(f"a LoRA layer of {len(output_sizes)} shards; the native kernel takes {MAX_SHARDS}")
        self.rank, self.input_size, self.output_sizes = max_rank, input_size, list(output_sizes)
        shards = len(output_sizes)
        a_stride, b_sizes = _slot_layout(max_rank, input_size, output_sizes)
        b_offsets = [sum(b_sizes[:i]) for i in range(shards)]
        b_stride = sum(b_sizes)
        self.a = torch.zeros(num_slots * a_stride, dtype=torch.bfloat16)
        self.b = torch.zeros(num_slots * b_stride, dtype=torch.bfloat16)
        pad = [0] * (MAX_SHARDS - shards)
        offsets = [sum(output_sizes[:i]) for i in range(shards)]
        self.struct = LoRASlotsStruct(self.a.data_ptr(), a_stride, self.b.data_ptr(), b_stride, input_size, max_rank,
                                      shards, (c_int64 * MAX_SHARDS)(*offsets, *pad),
                                      (c_int64 * MAX_SHARDS)(*output_sizes, *pad),
                                      (c_int64 * MAX_SHARDS)(*b_offsets, *pad))
        self.pointer = ctypes.addressof(self.struct)

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        lib, s, rank = kernels(), self.struct, self.rank
        a = torch.zeros(s.shards * rank, self.input_size, dtype=torch.bfloat16)
        for shard, (shard_a, _) in (shards or {}).items():
            a[shard * rank:shard * rank + shard_a.shape[0]] = shard_a
        lib.pack_bf16(s.a + slot * s.a_stride * 2, a.data_ptr(), a.shape[0], a.shape[1])
        for shard, out in enumerate(self.output_sizes):
            b = torch.zeros(out, rank, dtype=torch.bfloat16)
            if shard in (shards or {}):
                shard_b = shards[shard][1]
                b[:, :shard_b.shape[1]] = shard_b
            lib.pack_bf16(s.b + (slot * s.b_stride + s.b_offset[shard]) * 2, b.data_ptr(), out, rank)

    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * 2


class LoRAGroups:
    """A step's tokens grouped by slot, once per step: ``order`` the tokens that have an adapter, slot by slot."""

    def __init__(self, token_slots: torch.Tensor, num_slots: int) -> None:
        token_slots = token_slots.to(torch.int64)
        counts = torch.bincount(token_slots + 1, minlength=num_slots + 1)
        self.order = torch.argsort(token_slots, stable=True)[int(counts[0]):].contiguous()
        self.counts = counts[1:].contiguous()
        self.struct = LoRAGroupsStruct(self.order.data_ptr(), self.counts.data_ptr(), num_slots)
        self.pointer = ctypes.addressof(self.struct)


def lora_shrink_expand(groups: LoRAGroups, y: torch.Tensor, x: torch.Tensor, slots: PackedLoRASlots,
                       scales: torch.Tensor, amx: bool = False) -> None:
    """``y[t] += (x[t] @ A[s].T * scales[s]) @ B[s].T`` in place for each grouped token ``t`` of slot ``s``; ``x``
    [T, in] and ``y`` [T, out] bf16, ``scales`` float32 [S]; ``amx``: the shrink may use AMX tiles."""
    if y.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
        raise TypeError(f"lora_shrink_expand (native): bfloat16 activations, got x {x.dtype} and y {y.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    target = y if y.stride(1) == 1 else y.contiguous()
    scales = scales.contiguous()
    rc = kernels().lora_shrink_expand(slots.pointer, groups.pointer, scales.data_ptr(), target.data_ptr(),
                                      target.stride(0), x.data_ptr(), x.stride(0), torch.get_num_threads(), int(amx))
    if rc != 0:
        raise RuntimeError(f"pagoda_lora_shrink_expand failed with code {rc}")
    if target is not y:
        y.copy_(target)
