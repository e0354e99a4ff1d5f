"""Mixture-of-experts building blocks: the router, the stacked experts (the ``fused_moe`` op) and the sparse MLP
block the MoE families share (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE).

Checkpoints store experts one by one (``experts.N.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` /
``w3`` / ``w2``); :meth:`FusedExperts.load_expert` copies each into its slice of the stacked parameters, which
the op prepares once after loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.models.layers import Linear
from pagoda.models.llama import LlamaMLP
from pagoda.ops import current_ops
from pagoda.ops.reference_moe import check_moe_activation
from pagoda.quantization.interface import QuantizationConfig

#: Checkpoint names of an expert's projections → (stacked parameter, part).
EXPERT_PROJECTIONS = {"gate_proj": ("w13_weight", "gate"), "up_proj": ("w13_weight", "up"),
                      "down_proj": ("w2_weight", "down"), "w1": ("w13_weight", "gate"), "w3": ("w13_weight", "up"),
                      "w2": ("w2_weight", "down")}


def check_unquantized_experts(quant_config: QuantizationConfig) -> None:
    if quant_config.name != "none" and not quant_config.dense_moe_experts:
        raise ValueError(f"quantization {quant_config.name!r} is not supported for mixture-of-experts models: MoE "
                         "experts only load unquantized (supported: none, and gguf, whose expert stacks are "
                         "dequantized on load)")


class _ExpertsMethod:
    """Hands the loaded stacked weights to the ``fused_moe`` op after loading (the loader calls every module's
    ``quant_method.process_weights_after_loading``)."""

    def process_weights_after_loading(self, layer: FusedExperts) -> None:
        layer.handle = layer.op.prepare(layer.w13_weight, layer.w2_weight)
        if not layer.op.keeps_weight:  # the op made its own copy
            layer.w13_weight = None
            layer.w2_weight = None


class FusedExperts(nn.Module):
    """``num_experts`` gated MLPs of the same shape, stacked: ``w13`` [E, 2I, H] (gate rows, then up rows) and
    ``w2`` [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        check_moe_activation(activation)
        self.num_experts, self.intermediate_size, self.activation = num_experts, intermediate_size, activation
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                                      requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.load_expert
        self.op = current_ops().fused_moe
        self.quant_method = _ExpertsMethod()
        self.handle = None

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str] | None = None) -> None:
        """Copy one expert's projection (``shard`` = (expert, "gate" | "up" | "down")) into its slice, or the whole
        stacked tensor (``shard`` None: checkpoints that store the experts fused)."""
        if shard is None:
            target = param.data
        else:
            expert, part = shard
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"checkpoint has expert {expert}, but the config has {self.num_experts} experts")
            target = param.data[expert]
            if part in ("gate", "up"):
                target = target.narrow(0, 0 if part == "gate" else self.intermediate_size, self.intermediate_size)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for experts {shard}: parameter {tuple(target.shape)} vs checkpoint "
                             f"{tuple(loaded.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.op.apply(self.handle, x, topk_weights, topk_ids, self.activation)


class TopKRouter(nn.Module):
    """Softmax over the experts' logits (float32), the top ``k``, renormalised to sum to one when ``renormalize``;
    ``weights_dtype`` is the dtype the family rounds the weights to before mixing (None: kept float32)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool,
                 quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 weights_dtype: torch.dtype | None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok = {top_k} must be between 1 and the {num_experts} experts")
        self.top_k, self.renormalize, self.weights_dtype = top_k, renormalize, weights_dtype
        self.gate = Linear(hidden_size, [num_experts], False, quant_config, prefix, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [T, H] → (float32 weights [T, k], expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_dtype is not None:
            weights = weights.to(self.weights_dtype).float()
        return weights, ids


class SparseMoeBlock(nn.Module):
    """The routed experts, plus (Qwen2-MoE) a shared expert every token takes, scaled by ``sigmoid`` of its gate."""

    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype, *,
                 num_experts: int, intermediate_size: int, renormalize: bool, round_weights: bool,
                 shared_intermediate_size: int = 0) -> None:
        super().__init__()
        check_unquantized_experts(quant_config)
        hidden = config.hidden_size
        self.router = TopKRouter(hidden, num_experts, config.num_experts_per_tok, renormalize, quant_config,
                                 f"{prefix}.gate", dtype, dtype if round_weights else None)
        self.experts = FusedExperts(num_experts, hidden, intermediate_size, getattr(config, "hidden_act", "silu"),
                                    dtype)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            shared = _SizedConfig(config, shared_intermediate_size)
            self.shared_expert = LlamaMLP(shared, quant_config, f"{prefix}.shared_expert", dtype, False)
            self.shared_expert_gate = Linear(hidden, [1], False, quant_config, f"{prefix}.shared_expert_gate", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class _SizedConfig:
    """``config`` with another ``intermediate_size`` (the shared expert's), for :class:`LlamaMLP`."""

    def __init__(self, config: Any, intermediate_size: int) -> None:
        self.hidden_size = config.hidden_size
        self.hidden_act = getattr(config, "hidden_act", "silu")
        self.intermediate_size = intermediate_size
