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

from pagoda.distributed.parallel_state import get_tp_group
from pagoda.distributed.tensor_parallel import expert_parallel_enabled
from pagoda.models.interface import RoutedExperts, SharedExpert
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
    ``w2`` [E, H, I].

    Under tensor parallelism the outputs are this rank's partial sums (the block all-reduces once): by default every
    rank holds a slice of every expert (gate/up rows and down columns ``[r·I/tp, (r+1)·I/tp)``, the op gets the
    slices unchanged); with ``enable_expert_parallel`` rank ``r`` holds experts ``[r·E/tp, (r+1)·E/tp)`` whole and
    computes them for the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str,
                 dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        check_moe_activation(activation)
        tp = get_tp_group()
        self.num_experts, self.activation, self.hidden_size, self.prefix = num_experts, activation, hidden_size, prefix
        self.lora = None  # adapter slots (pagoda.lora.experts.ExpertsLoRA) when the engine serves LoRA adapters
        self.expert_parallel = expert_parallel_enabled() and tp.world_size > 1
        self.first_expert, local_experts = 0, num_experts
        self.inter_start, self.intermediate_size = 0, intermediate_size
        self.full_intermediate_size = intermediate_size
        if self.expert_parallel:
            if num_experts % tp.world_size:
                raise ValueError(f"enable_expert_parallel: the number of experts ({num_experts}) must be divisible "
                                 f"by tensor_parallel_size ({tp.world_size})")
            local_experts = num_experts // tp.world_size
            self.first_expert = tp.rank_in_group * local_experts
        elif tp.world_size > 1:
            if intermediate_size % tp.world_size:
                raise ValueError(f"the experts' intermediate size ({intermediate_size}) must be divisible by "
                                 f"tensor_parallel_size ({tp.world_size}); or set enable_expert_parallel")
            self.intermediate_size = intermediate_size // tp.world_size
            self.inter_start = tp.rank_in_group * self.intermediate_size
        self.local_experts = local_experts
        inter = self.intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(local_experts, 2 * inter, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(local_experts, hidden_size, inter, dtype=dtype),
                                      requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.load_expert
        self.op = current_ops().fused_moe
        self.quant_method = _ExpertsMethod()
        self.handle = None

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str] | None = None) -> None:
        """Copy one expert's projection (``shard`` = (expert, "gate" | "up" | "down")) into its slice, or the whole
        stacked tensor (``shard`` None: checkpoints that store the experts fused); only this rank's experts and
        this rank's slice of each."""
        if shard is None:
            target = param.data
            loaded = self._rank_part(loaded.narrow(0, self.first_expert, self.local_experts), param is self.w2_weight,
                                     expert_dim=1)
        else:
            expert, part = shard
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"checkpoint has expert {expert}, but the config has {self.num_experts} experts")
            if not self.first_expert <= expert < self.first_expert + self.local_experts:
                return  # another rank's expert
            target = param.data[expert - self.first_expert]
            if part in ("gate", "up"):
                target = target.narrow(0, 0 if part == "gate" else self.intermediate_size, self.intermediate_size)
            loaded = self._rank_part(loaded, part == "down", expert_dim=0)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for experts {shard}: parameter {tuple(target.shape)} vs checkpoint "
                             f"{tuple(loaded.shape)}")
        target.copy_(loaded)

    def _rank_part(self, tensor: torch.Tensor, is_down: bool, expert_dim: int) -> torch.Tensor:
        """This rank's slice of the intermediate features of one expert's (``expert_dim`` 0) or the stacked
        (``expert_dim`` 1: the dims are shifted by one) gate/up rows or down columns."""
        if self.intermediate_size == self.full_intermediate_size:
            return tensor
        if is_down:
            return tensor.narrow(expert_dim + 1, self.inter_start, self.intermediate_size)
        if expert_dim == 1:  # stacked [E, 2I, H]: this rank's gate rows and its up rows
            full = self.full_intermediate_size
            return torch.cat([tensor.narrow(1, self.inter_start, self.intermediate_size),
                              tensor.narrow(1, full + self.inter_start, self.intermediate_size)], dim=1)
        return tensor.narrow(0, self.inter_start, self.intermediate_size)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel:
            return self._local_experts(x, topk_weights, topk_ids)
        token_slots = self.lora.rows() if self.lora is not None else None
        if token_slots is not None:  # some tokens' adapters adapt these experts
            return self.lora.forward(self.op, self.handle, x, topk_weights, topk_ids, self.activation, token_slots)
        return self.op.apply(self.handle, x, topk_weights, topk_ids, self.activation)

    def _local_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' share of the mixture: the tokens routed to at least one of them, each token's other
        slots weighted 0 and pointed at one of its local experts (so no other expert's weights are read)."""
        local_ids = topk_ids - self.first_expert
        mine = (local_ids >= 0) & (local_ids < self.local_experts)
        out = torch.zeros_like(x)
        rows = mine.any(dim=-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return out
        mine, local_ids = mine[rows], local_ids[rows]
        some_local = local_ids.masked_fill(~mine, -1).max(dim=-1, keepdim=True).values
        ids = torch.where(mine, local_ids, some_local)
        weights = topk_weights[rows].masked_fill(~mine, 0)
        out[rows] = self.op.apply(self.handle, x[rows], weights, ids, self.activation)
        return out


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
        self.topk = current_ops().moe_topk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [T, H] → (float32 weights [T, k], expert ids [T, k])."""
        weights, ids = self.topk(self.gate(x), self.top_k, self.renormalize)
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
                                    dtype, f"{prefix}.experts")
        tp = get_tp_group()
        self.tp_group = tp if tp.world_size > 1 else None
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:  # tensor-parallel like a dense MLP, its partial sums reduced with the experts'
            shared = _SizedConfig(config, shared_intermediate_size)
            self.shared_expert = LlamaMLP(shared, quant_config, f"{prefix}.shared_expert", dtype, False,
                                          reduce_output=False)
            self.shared_expert_gate = Linear(hidden, [1], False, quant_config, f"{prefix}.shared_expert_gate", dtype)

    def routed_experts(self) -> RoutedExperts:
        """This block as a decoder stack declares it (a kernel is None where a layer's quantization exposes none)."""
        router, experts, shared = self.router, self.experts, None
        if self.shared_expert is not None:
            mlp, gate = self.shared_expert, self.shared_expert_gate
            shared = SharedExpert(*(m.quant_method.kernel(m) for m in (mlp.gate_up_proj, mlp.down_proj, gate)),
                                  mlp.gate_up_proj.output_sizes[0], mlp.act.act,
                                  (mlp.gate_up_proj.lora, mlp.down_proj.lora))
        return RoutedExperts(router.gate.quant_method.kernel(router.gate), experts.op, experts.handle,
                             experts.num_experts, experts.intermediate_size, router.top_k, router.renormalize,
                             router.weights_dtype is not None, experts.activation, shared, experts.lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.tp_group is not None:  # one all-reduce for the routed and shared experts' partial sums
            out = self.tp_group.all_reduce(out)
        return out


class _SizedConfig:
    """``config`` with another ``intermediate_size`` (the shared expert's), for :class:`LlamaMLP`."""

    def __init__(self, config: Any, intermediate_size: int) -> None:
        self.hidden_size = config.hidden_size
        self.hidden_act = getattr(config, "hidden_act", "silu")
        self.intermediate_size = intermediate_size
