"""The Phi-3 (Phi3ForCausalLM) model family. Registered as a built-in plugin.

Phi-3 is the Llama decoder (pre-norm RMSNorm, rotate-half rotary, SiLU-gated MLP, grouped-query attention, no
projection biases) with three differences, all handled by shared code:

* its checkpoints store ``qkv_proj`` and ``gate_up_proj`` already fused, which are exactly the merged layers the
  Llama decoder builds, so each loads whole (no shard index) — also through the quantized formats' loaders;
* ``partial_rotary_factor`` and LongRoPE (``longrope``, formerly ``su``) scaling: :class:`RotaryEmbedding`;
* a model-wide ``sliding_window`` (Phi-3-mini-4k: 2047), read by the engine configuration like Mistral's.
"""

from __future__ import annotations

from typing import Any

from pagoda.models.llama import LlamaForCausalLM
from pagoda.plugins.hookspecs import hookimpl


class Phi3ForCausalLM(LlamaForCausalLM):
    # The checkpoint's qkv_proj / gate_up_proj names already are the merged layers' (loaded whole); the inherited
    # q/k/v and gate/up stacking only applies to checkpoints converted to Llama's split layout.

    def arch_flags(self, config: Any) -> dict[str, bool]:
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False}


@hookimpl
def pagoda_register_models():
    return {"Phi3ForCausalLM": Phi3ForCausalLM}
