"""The Qwen3 family (Qwen3ForCausalLM). Registered as a built-in plugin.

Qwen3 is the Llama layer with two changes: each head's query and key are RMS-normalised (a weight per head
dimension, shared by the heads) before the rotary embedding, and ``head_dim`` is explicit (``heads * head_dim``
need not equal ``hidden_size``). ``attention_bias`` puts a bias on all four projections. The attention and layer
defined here are also the Qwen3-MoE family's (:mod:`pagoda.models.moe`). A sliding window applies to the layers
``layer_types`` marks ``sliding_attention`` (the engine configuration's per-layer windows).
"""

from __future__ import annotations

from typing import Any

import torch

from pagoda.models.layers import RMSNorm
from pagoda.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from pagoda.plugins.hookspecs import hookimpl


class Qwen3Attention(LlamaAttention):
    """Llama attention with a per-head RMSNorm of queries and keys before the rotary embedding."""

    def __init__(self, config: Any, layer_idx: int, quant_config, prefix: str, dtype: torch.dtype, backend,
                 attn_config, qkv_bias: bool, o_bias: bool, rotary, sliding_window: int | None) -> None:
        super().__init__(config, layer_idx, quant_config, prefix, dtype, backend, attn_config, qkv_bias, o_bias,
                         rotary, sliding_window)
        self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps, dtype)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, kv_cache: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_size))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_size))
        q, k = self.rotary(rope, q, k)
        out = self.attn(q, k, v.reshape(-1, self.num_kv_heads, self.head_size), kv_cache, metadata)
        return self.o_proj(out)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention
    llama_recipe = True  # the recipe's per-head q/k norms (DecoderLayerSpec.q_norm / k_norm)


def qwen3_arch_flags(config: Any) -> dict[str, bool]:
    bias = bool(getattr(config, "attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False}


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer

    def arch_flags(self, config: Any) -> dict[str, bool]:
        return qwen3_arch_flags(config)


@hookimpl
def pagoda_register_models():
    return {"Qwen3ForCausalLM": Qwen3ForCausalLM}
