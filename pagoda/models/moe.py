"""The mixture-of-experts families: Mixtral, Qwen2-MoE and Qwen3-MoE. Registered as a built-in plugin.

Each is its dense sibling (Llama / Qwen2 / Qwen3 attention) with the MLP of some layers replaced by a
:class:`SparseMoeBlock` that routes every token to its top-k experts (the ``fused_moe`` op):

* **Mixtral**: softmax over the experts, top-k, renormalised to sum to one (the weights stay float32); every layer
  is sparse; checkpoints name the block ``block_sparse_moe`` and the experts' projections ``w1`` (gate), ``w3``
  (up), ``w2`` (down).
* **Qwen2-MoE**: softmax, top-k, renormalised only with ``norm_topk_prob``, weights rounded to the model dtype;
  plus a shared expert every token takes, scaled by ``sigmoid(shared_expert_gate(x))``; q/k/v biases.
* **Qwen3-MoE**: Qwen3 attention (per-head q/k norms), Qwen2-MoE's routing, no shared expert.

In both Qwen families a layer is sparse unless it is listed in ``mlp_only_layers`` or ``(layer + 1)`` is not a
multiple of ``decoder_sparse_step``; the others keep a dense MLP of ``intermediate_size``. Quantized checkpoints
are refused (the experts load unquantized only). Every family's sparse layers declare their experts, Qwen2-MoE's
shared expert included, for a platform's fused decode step (:meth:`LlamaDecoderLayer.routed_experts`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pagoda.models.interface import RoutedExperts
from pagoda.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagoda.models.moe_layers import EXPERT_PROJECTIONS, SparseMoeBlock
from pagoda.models.qwen3 import Qwen3Attention, qwen3_arch_flags
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import QuantizationConfig

_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
#: Checkpoints that store the experts already stacked (transformers' own fused layout).
_STACKED_NAMES = {".experts.gate_up_proj": ".experts.w13_weight", ".experts.down_proj": ".experts.w2_weight"}


class MoeForCausalLM(LlamaForCausalLM):
    """What the MoE families share: the checkpoint names of the experts and the router (each sparse block refuses
    quantized checkpoints)."""

    def map_weight_name(self, name: str) -> tuple[str, Any]:
        match = _EXPERT_NAME.match(name)
        if match and match.group(3) in EXPERT_PROJECTIONS:
            param, part = EXPERT_PROJECTIONS[match.group(3)]
            return f"{match.group(1)}.{param}", (int(match.group(2)), part)
        for stored, param in _STACKED_NAMES.items():
            if name.endswith(stored):
                return name.removesuffix(stored) + param, None
        if name.endswith(".mlp.gate.weight"):
            return name.removesuffix("gate.weight") + "router.gate.weight", None
        return super().map_weight_name(name)


class MixtralDecoderLayer(LlamaDecoderLayer):
    llama_recipe = True  # its routed experts are the recipe's RoutedExperts

    def routed_experts(self) -> RoutedExperts | None:
        return self.mlp.routed_experts()

    def make_mlp(self, config: Any, layer_idx: int, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype, arch: dict[str, bool]) -> nn.Module:
        return SparseMoeBlock(config, quant_config, prefix, dtype, num_experts=config.num_local_experts,
                              intermediate_size=config.intermediate_size, renormalize=True, round_weights=False)


class MixtralForCausalLM(MoeForCausalLM):
    layer_cls = MixtralDecoderLayer

    def module_path(self, path: str) -> str:
        return path.replace(".block_sparse_moe.", ".mlp.")  # transformers 4's name of the experts block

    def map_weight_name(self, name: str) -> tuple[str, Any]:
        return super().map_weight_name(self.module_path(name))


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Whether a Qwen MoE layer routes to experts (else it keeps a dense MLP)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % step == 0)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    #: Whether sparse layers have a shared expert (Qwen2-MoE), of shared_expert_intermediate_size.
    shared_expert = True
    llama_recipe = True  # its sparse layers are the recipe's RoutedExperts, the shared expert included

    def routed_experts(self) -> RoutedExperts | None:
        return self.mlp.routed_experts() if isinstance(self.mlp, SparseMoeBlock) else None

    def make_mlp(self, config: Any, layer_idx: int, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype, arch: dict[str, bool]) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config, quant_config, prefix, dtype, False)
        shared = config.shared_expert_intermediate_size if self.shared_expert else 0
        return SparseMoeBlock(config, quant_config, prefix, dtype, num_experts=config.num_experts,
                              intermediate_size=config.moe_intermediate_size,
                              renormalize=bool(getattr(config, "norm_topk_prob", False)), round_weights=True,
                              shared_intermediate_size=shared)


class Qwen2MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer

    def arch_flags(self, config: Any) -> dict[str, bool]:
        return {"qkv_bias": bool(getattr(config, "qkv_bias", True)), "o_bias": False, "mlp_bias": False}


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_cls = Qwen3Attention
    shared_expert = False
    llama_recipe = True  # read from each class itself (LlamaDecoderLayer.llama_recipe)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer

    def arch_flags(self, config: Any) -> dict[str, bool]:
        return qwen3_arch_flags(config)


@hookimpl
def pagoda_register_models():
    return {"MixtralForCausalLM": MixtralForCausalLM, "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
            "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM}
