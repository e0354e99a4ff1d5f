"""Reading a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) into
host memory, checked against the model it will run on.

The adapter's per-module matrices are keyed by pagoda's layer names: ``q_proj`` / ``k_proj`` / ``v_proj`` become
shards 0/1/2 of ``qkv_proj``, ``gate_proj`` / ``up_proj`` shards 0/1 of ``gate_up_proj`` (the model's
``stacked_params`` say which). A module's own rank and alpha (``rank_pattern`` / ``alpha_pattern``) are folded into
its ``B`` (scaled by its scaling over the adapter's), so every layer applies the adapter's one scaling. LoRA on a
mixture-of-experts block's routed experts is read by :mod:`pagoda.lora.peft_experts`. Options pagoda can't apply
are errors naming them, never silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagoda.lora.peft_experts import ExpertsAdapter, ExpertsShape, expert_block, parse_experts
from pagoda.lora.request import LoRARequest

#: The projections an adapter may target (PEFT's module names in Llama-style models).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings")


@dataclass
class LoRAModel:
    """One adapter in host memory: per pagoda layer name, per shard, its ``(A [r, in], B [out_shard, r])``; per
    experts block (its module path), its routed experts' LoRA."""

    lora_int_id: int
    rank: int
    scaling: float
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    experts: dict[str, ExpertsAdapter] = field(default_factory=dict)


def load_peft_adapter(request: LoRARequest, layers: dict[str, tuple[int, list[int]]],
                      stacked_params: tuple[tuple[str, str, int], ...], max_lora_rank: int,
                      dtype: torch.dtype, experts: dict[str, ExpertsShape] | None = None,
                      module_path: Callable[[str], str] = str) -> LoRAModel:
    """Read ``request.lora_path``. ``layers``: the model's LoRA-capable layers, name → (input size, shard output
    sizes); ``experts``: its experts blocks that take LoRA, module path → shape; ``module_path``: an adapter's
    module path as the model names the module (the model's ``module_path``). Any problem is a ``ValueError``
    naming the adapter and the option or module."""
    path = request.lora_path
    where = f"LoRA adapter {request.lora_name!r} ({path})"
    config_file = os.path.join(path, "adapter_config.json")
    if not path or not os.path.isfile(config_file):
        raise ValueError(f"lora_path: {where} has no adapter_config.json")
    with open(config_file) as f:
        config = json.load(f)
    _check_config(config, where, max_lora_rank)
    rank = int(config["r"])

    def scaling_of(module: str, module_rank: int) -> float:  # PEFT's: lora_alpha (or its pattern's) over the rank
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
        return alpha / math.sqrt(module_rank) if config.get("use_rslora") else alpha / module_rank

    scaling = scaling_of("", rank)
    tensors = _read_tensors(path, where)
    merged_of = {original: (merged, shard) for merged, original, shard in stacked_params}
    pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[str, int], str] = {}  # (layer, shard) -> the adapter's module path
    expert_tensors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if "lora_embedding" in name or any(f".{m}." in f".{name}" for m in _EMBEDDING_MODULES):
            raise ValueError(f"target_modules: {where} adapts an embedding or the LM head ({name}); only "
                             f"{', '.join(SUPPORTED_MODULES)} are supported")
        if name.endswith(".lora_A.weight"):
            module, kind = name[: -len(".lora_A.weight")], "A"
        elif name.endswith(".lora_B.weight"):
            module, kind = name[: -len(".lora_B.weight")], "B"
        elif name.endswith(".bias"):
            raise ValueError(f"bias: {where} has bias tensors ({name}); only bias='none' is supported")
        else:
            raise ValueError(f"{where}: tensor {name!r} is not a LoRA A/B matrix (DoRA magnitudes and "
                             "modules_to_save are not supported)")
        module = module.removeprefix("base_model.model.")
        block = expert_block(module)
        if block is not None:
            block = module_path(block)
            if block not in (experts or {}):
                raise ValueError(f"target_modules/target_parameters: {where} adapts routed experts ({module!r}), "
                                 "which this model has no experts block for that takes LoRA")
            expert_tensors.setdefault(block, {}).setdefault(module, {})[kind] = tensor
            continue
        parent, _, leaf = module.rpartition(".")
        layer_name, shard = (f"{parent}.{merged_of[leaf][0]}", merged_of[leaf][1]) if leaf in merged_of \
            else (module, 0)
        if leaf not in SUPPORTED_MODULES or layer_name not in layers:
            raise ValueError(f"target_modules: {where} adapts {module!r}, which the model has no LoRA-capable layer "
                             f"for; supported modules: {', '.join(SUPPORTED_MODULES)}")
        pairs.setdefault((layer_name, shard), {})[kind] = tensor
        modules[(layer_name, shard)] = module
    model = LoRAModel(request.lora_int_id, rank, scaling)
    for (layer_name, shard), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: {layer_name} shard {shard} has lora_{next(iter(pair))} without its pair")
        a, b = pair["A"], pair["B"]
        in_size, out_sizes = layers[layer_name]
        module = modules[(layer_name, shard)]
        r = int(_pattern_value(config.get("rank_pattern"), module, rank))
        if a.shape != (r, in_size) or b.shape != (out_sizes[shard], r):
            raise ValueError(f"{where}: {layer_name} shard {shard} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                             f"expected ({r}, {in_size}) and ({out_sizes[shard]}, {r}) for r={r} (r, or its "
                             "rank_pattern)")
        if r > max_lora_rank:
            raise ValueError(f"rank_pattern: {where} gives {module} rank {r}, above max_lora_rank "
                             f"({max_lora_rank}); raise max_lora_rank")
        ratio = scaling_of(module, r) / scaling
        if ratio != 1.0:
            b = b.float() * ratio
        model.weights.setdefault(layer_name, {})[shard] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    for block, block_tensors in expert_tensors.items():  # float32, as the experts' slots hold them
        model.experts[block] = parse_experts(block, experts[block], block_tensors, where, scaling_of, max_lora_rank)
    if not model.weights and not model.experts:
        raise ValueError(f"{where}: the adapter holds no LoRA weights")
    return model


def _pattern_value(patterns: dict | None, module: str, default):
    """``rank_pattern`` / ``alpha_pattern``'s value for ``module`` as PEFT matches them (the first pattern that
    matches the end of the module path after a dot), else ``default``."""
    for pattern, value in (patterns or {}).items():
        if module and re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _check_config(config: dict, where: str, max_lora_rank: int) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type: {where} is a {config.get('peft_type')} adapter; only LORA is supported")
    if config.get("use_dora"):
        raise ValueError(f"use_dora: {where} is a DoRA adapter, which is not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"modules_to_save: {where} saves whole modules ({config['modules_to_save']}), which is "
                         "not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias: {where} has bias={config['bias']!r}; only 'none' is supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [] if targets == "all-linear" else [targets]
    for target in targets:
        if target in _EMBEDDING_MODULES:
            raise ValueError(f"target_modules: {where} targets {target!r}; embedding and LM-head adapters are "
                             f"not supported (supported: {', '.join(SUPPORTED_MODULES)})")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"r: {where} has r={rank!r}; it must be a positive integer")
    if rank > max_lora_rank:
        raise ValueError(f"r: {where} has rank {rank}, above max_lora_rank ({max_lora_rank}); raise "
                         "max_lora_rank")


def _read_tensors(path: str, where: str) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    bin_file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"lora_path: {where} has neither adapter_model.safetensors nor adapter_model.bin")
