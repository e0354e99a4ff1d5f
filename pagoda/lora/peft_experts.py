"""An adapter's LoRA on a mixture-of-experts block's routed experts, in the two forms PEFT saves it.

* **Parameter targets** (PEFT 0.18+ ``target_parameters`` on transformers' stacked experts, and what PEFT 0.22 makes
  of ``target_modules`` naming ``gate_proj`` / ``up_proj`` / ``down_proj`` on such a model): one pair of flat
  matrices per stacked parameter, ``lora_A`` [E·r, in] (expert-major) and ``lora_B`` [out, r·E] (rank-major), under
  ``…experts.lora_*`` and ``…experts.base_layer.lora_*`` (one wrapper inside the other). Which of the two is
  ``gate_up_proj`` (in = hidden, out = 2 × intermediate) and which ``down_proj`` (in = intermediate, out = hidden)
  is read from their shapes, which always differ.
* **Per-expert modules** (``…experts.N.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` / ``w3`` /
  ``w2``): gate and up become one fused gate-up adapter of twice the rank, as PEFT itself fuses them.

Either way the result is, per block, ``A13`` [E, r13, H], ``B13`` [E, 2I, r13], ``A2`` [E, r2, I] and ``B2``
[E, H, r2] (a part the adapter leaves out is None), each ``B`` already multiplied by its module's scaling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Per-expert projections → (part, half of the fused gate-up rows or None).
_EXPERT_MODULES = {"gate_proj": ("gate_up", 0), "w1": ("gate_up", 0), "up_proj": ("gate_up", 1),
                   "w3": ("gate_up", 1), "down_proj": ("down", None), "w2": ("down", None)}
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")
_WRAPPED = re.compile(r"^(.*\.experts)((?:\.base_layer)*)$")


@dataclass
class ExpertsShape:
    num_experts: int
    hidden: int
    intermediate: int


@dataclass
class ExpertsAdapter:
    """One block's routed-expert LoRA, each ``B`` scaled (None: the part is not adapted)."""

    a13: torch.Tensor | None = None  # [E, r13, H]
    b13: torch.Tensor | None = None  # [E, 2I, r13]
    a2: torch.Tensor | None = None  # [E, r2, I]
    b2: torch.Tensor | None = None  # [E, H, r2]


def expert_block(module: str) -> str | None:
    """The experts block ``module`` (an adapter's module path) belongs to, or None."""
    match = _PER_EXPERT.match(module) or _WRAPPED.match(module)
    return match.group(1) if match else None


def parse_experts(block: str, shape: ExpertsShape, tensors: dict[str, dict[str, torch.Tensor]], where: str,
                  scaling_of: Callable[[str, int], float], max_rank: int) -> ExpertsAdapter:
    """``tensors``: module path (under ``block``) → {"A": …, "B": …}; ``scaling_of(name, rank)`` the scaling of
    the PEFT target ``name`` at ``rank``. Gate-up adapters may have up to ``2 * max_rank``, down ones
    ``max_rank``."""
    adapter = ExpertsAdapter()
    # part ("gate_up" / "down") -> expert -> half of the gate-up rows (None: down) -> (A, scaled B)
    per_expert: dict[str, dict[int, dict[int | None, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module, pair in tensors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: {module} has lora_{next(iter(pair))} without its pair")
        a, b = pair["A"].float(), pair["B"].float()
        match = _PER_EXPERT.match(module)
        if match:
            expert, leaf = int(match.group(2)), match.group(3)
            if leaf not in _EXPERT_MODULES or not 0 <= expert < shape.num_experts:
                raise ValueError(f"target_modules: {where} adapts {module!r}, which the model's experts block "
                                 f"{block} ({shape.num_experts} experts) has no projection for; supported: "
                                 f"{', '.join(_EXPERT_MODULES)}")
            part, half = _EXPERT_MODULES[leaf]
            _check_pair(a, b, _in_out(shape, part), module, where)
            scaled = b * scaling_of(module, a.shape[0])
            per_expert.setdefault(part, {}).setdefault(expert, {})[half] = (a, scaled)
            continue
        _set_wrapped(adapter, block, shape, a, b, module, where, scaling_of)
    if per_expert:
        if adapter.a13 is not None or adapter.a2 is not None:
            raise ValueError(f"{where}: {block} is adapted both per expert and as stacked parameters")
        _set_per_expert(adapter, shape, per_expert)
    for name, a, limit in (("gate_up_proj", adapter.a13, 2 * max_rank), ("down_proj", adapter.a2, max_rank)):
        if a is not None and a.shape[1] > limit:
            raise ValueError(f"r: {where} adapts {block}.{name} with rank {a.shape[1]}, above {limit} (the routed "
                             f"experts' {name} takes {'2 × ' if limit != max_rank else ''}max_lora_rank); raise "
                             "max_lora_rank")
    return adapter


def _in_out(shape: ExpertsShape, part: str) -> tuple[int, int]:
    """An expert's (inputs, outputs) for one of its projections: gate or up, or down."""
    return (shape.intermediate, shape.hidden) if part == "down" else (shape.hidden, shape.intermediate)


def _check_pair(a: torch.Tensor, b: torch.Tensor, in_out: tuple[int, int], module: str, where: str) -> None:
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_out[0] or b.shape != (in_out[1], rank):
        raise ValueError(f"{where}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected (r, "
                         f"{in_out[0]}) and ({in_out[1]}, r)")


def _set_wrapped(adapter: ExpertsAdapter, block: str, shape: ExpertsShape, a: torch.Tensor, b: torch.Tensor,
                 module: str, where: str, scaling_of: Callable[[str, int], float]) -> None:
    """A stacked-parameter target: which one, from its in and out sizes."""
    experts, hidden, inter = shape.num_experts, shape.hidden, shape.intermediate
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or b.shape[1] != a.shape[0]:
        raise ValueError(f"{where}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not a LoRA of "
                         f"{experts} stacked experts (A [E·r, in], B [out, r·E])")
    rank = a.shape[0] // experts
    if (a.shape[1], b.shape[0]) == (hidden, 2 * inter):
        name = "gate_up_proj"
    elif (a.shape[1], b.shape[0]) == (inter, hidden):
        name = "down_proj"
    else:
        raise ValueError(f"{where}: {module} maps {a.shape[1]} inputs to {b.shape[0]} outputs; {block}'s "
                         f"gate_up_proj maps {hidden} to {2 * inter} and its down_proj {inter} to {hidden}")
    a_e = a.reshape(experts, rank, a.shape[1])
    b_e = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1) * scaling_of(f"{block}.{name}", rank)
    if name == "gate_up_proj":
        if adapter.a13 is not None:
            raise ValueError(f"{where}: {block}.gate_up_proj is adapted twice")
        adapter.a13, adapter.b13 = a_e.contiguous(), b_e.contiguous()
    else:
        if adapter.a2 is not None:
            raise ValueError(f"{where}: {block}.down_proj is adapted twice")
        adapter.a2, adapter.b2 = a_e.contiguous(), b_e.contiguous()


def _set_per_expert(adapter: ExpertsAdapter, shape: ExpertsShape, parts: dict) -> None:
    """Per-expert pairs stacked, gate and up side by side in one gate-up adapter (rank: both halves')."""
    experts, hidden, inter = shape.num_experts, shape.hidden, shape.intermediate
    if "gate_up" in parts:
        # Gate's adapters take the first ranks[0] ranks, up's the next ranks[1] (the largest of each half).
        ranks = [max((halves[half][0].shape[0] for halves in parts["gate_up"].values() if half in halves), default=0)
                 for half in (0, 1)]
        a13 = torch.zeros(experts, sum(ranks), hidden)
        b13 = torch.zeros(experts, 2 * inter, sum(ranks))
        for expert, halves in parts["gate_up"].items():
            for half, (a, b) in halves.items():
                base = ranks[0] * half
                a13[expert, base:base + a.shape[0]] = a
                b13[expert, half * inter:(half + 1) * inter, base:base + a.shape[0]] = b
        adapter.a13, adapter.b13 = a13, b13
    if "down" in parts:
        rank = max(pair[0].shape[0] for e in parts["down"].values() for pair in e.values())
        a2, b2 = torch.zeros(experts, rank, inter), torch.zeros(experts, hidden, rank)
        for expert, halves in parts["down"].items():
            a, b = halves[None]
            a2[expert, : a.shape[0]], b2[expert, :, : a.shape[0]] = a, b
        adapter.a2, adapter.b2 = a2, b2
