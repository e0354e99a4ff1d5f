"""Tensor-level entry points to the native mixture-of-experts kernels (``cpu_moe.h``): the router's top-k and the
fused expert MLP."""

from __future__ import annotations

import ctypes
from ctypes import c_int64, c_void_p
from typing import Any

import torch

from pagoda.platforms.cpu.kernels.cpu import kernels
from pagoda.platforms.cpu.kernels.cpu_ops import PackedWeight, packed_elems


class PackedExperts:
    """Stacked expert weights, each expert's matrix packed as :func:`cpu_ops.pack_weight` packs one (tiles of 16
    output rows, k-pairs interleaved), one expert after another: ``w13`` from [E, 2I, H], ``w2`` from [E, H, I]."""

    __slots__ = ("w13", "w2", "num_experts", "hidden", "intermediate")

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, num_experts: int, hidden: int, intermediate: int) -> None:
        self.w13, self.w2 = w13, w2
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate

    def nbytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * 2

    def expert(self, expert: int, part: str) -> PackedWeight:
        """Expert ``expert``'s ``w13`` [2I, H] (``part`` "gate_up") or ``w2`` [H, I] ("down") as a packed weight
        (a view, for :func:`cpu_ops.packed_linear`)."""
        stack, n, k = ((self.w13, 2 * self.intermediate, self.hidden) if part == "gate_up"
                       else (self.w2, self.hidden, self.intermediate))
        per = packed_elems(n, k)
        return PackedWeight(stack[expert * per:(expert + 1) * per], n, k, None)


def _pack_stack(weights: torch.Tensor) -> torch.Tensor:
    lib = kernels()
    experts, n, k = weights.shape
    per = packed_elems(n, k)
    data = torch.empty(experts * per, dtype=torch.bfloat16)
    for e in range(experts):  # once, after loading
        w = weights[e].to(torch.bfloat16).contiguous()
        lib.pack_bf16(data.data_ptr() + e * per * 2, w.data_ptr(), n, k)
    return data


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> PackedExperts:
    """Pack ``w13`` [E, 2I, H] and ``w2`` [E, H, I] (bf16) for :func:`fused_moe`."""
    experts, hidden, inter = w2.shape
    return PackedExperts(_pack_stack(w13), _pack_stack(w2), experts, hidden, inter)


#: Tokens per native call: the kernel's grouped activations (gate/up outputs: tokens x top-k x 2I) are allocated
#: per call, so a long prefill is taken in slices to bound them; each slice still reads every weight only once.
TOKENS_PER_CALL = 1024


class MoELoRASlots(ctypes.Structure):
    """``cpu_moe_lora.h``'s MoELoRASlots: an experts block's adapter slots (:class:`pagoda.lora.experts.ExpertsLoRA`,
    bf16 or float32) as the native kernel reads them; keeps the slots alive."""

    _fields_ = [(name, c_void_p) for name in ("a13", "bt13", "a2", "bt2", "adapted")] + [
        ("num_slots", c_int64), ("rank", c_int64), ("bf16", c_int64)]

    def __init__(self, lora: Any) -> None:
        tensors = (lora.a13, lora.bt13, lora.a2, lora.bt2)
        kind = lora.a13.dtype
        if kind not in (torch.float32, torch.bfloat16) or any(t.dtype != kind or not t.is_contiguous()
                                                              for t in tensors):
            raise TypeError("fused_moe: expert adapter slots must be contiguous, all float32 or all bfloat16")
        super().__init__(*(t.data_ptr() for t in tensors), lora.adapted_mask.data_ptr(), lora.a13.shape[0],
                         lora.a2.shape[2], int(kind == torch.bfloat16))
        self.lora = lora


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: PackedExperts,
              amx: bool = False, lora: MoELoRASlots | None = None,
              token_slots: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture of each token's top-k experts for bf16 ``x`` [T, H]; ``amx`` only where the process may use
    AMX tiles. With ``lora`` and ``token_slots`` (each token's adapter slot, -1: none), the adapted tokens' experts
    take their slot's deltas."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"fused_moe takes bfloat16 inputs, got {x.dtype}")
    x = x.contiguous()
    weights = topk_weights.float().contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    tokens, k = ids.shape
    out = torch.empty(tokens, experts.hidden, dtype=torch.bfloat16)
    slots = None
    if lora is not None and token_slots is not None:
        slots = token_slots.to(torch.int64).contiguous()
        if slots.shape != (tokens,):
            raise ValueError(f"fused_moe: token_slots must be [{tokens}], got {list(slots.shape)}")
    lib = kernels()
    for start in range(0, tokens, TOKENS_PER_CALL):
        n = min(TOKENS_PER_CALL, tokens - start)
        rc = lib.fused_moe(out[start].data_ptr(), x[start].data_ptr(), weights[start].data_ptr(),
                           ids[start].data_ptr(), n, k, experts.w13.data_ptr(), experts.w2.data_ptr(),
                           experts.num_experts, experts.hidden, experts.intermediate, torch.get_num_threads(),
                           int(amx), ctypes.byref(lora) if slots is not None else None,
                           slots[start].data_ptr() if slots is not None else None)
        if rc == -2:
            raise ValueError(f"fused_moe: an expert id is outside 0..{experts.num_experts - 1}")
        if rc != 0:
            raise RuntimeError(f"pagoda_fused_moe failed with code {rc}")
    return out


def moe_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts from bf16 router ``logits`` [T, E]: float32 softmax weights in descending
    order (divided by their sum when ``renormalize``) and int64 ids."""
    if logits.dtype != torch.bfloat16:
        raise TypeError(f"moe_topk takes bfloat16 logits, got {logits.dtype}")
    logits = logits.contiguous()
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    rc = kernels().moe_topk(weights.data_ptr(), ids.data_ptr(), logits.data_ptr(), tokens, experts, top_k,
                            int(renormalize))
    if rc == -2:
        raise ValueError(f"moe_topk: top_k {top_k} is not between 1 and the {experts} experts")
    if rc != 0:
        raise RuntimeError(f"pagoda_moe_topk failed with code {rc}")
    return weights, ids
