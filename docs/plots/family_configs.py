"""Write the model directories the model-family benchmarks run with ``--load-format dummy``: an OPT-125m-shaped, a
Gemma-3-270m-shaped, a small Mixtral-shaped, a small Qwen2-MoE-shaped and a Qwen3-0.6B-shaped config (config.json
plus the bundled SmolLM2 tokenizer, so both engines can start; the workloads feed random token ids, so the
tokenizer's vocabulary never matters).

Usage: python docs/plots/family_configs.py OUT_DIR [TOKENIZER_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers import Gemma3TextConfig, MixtralConfig, OPTConfig, Qwen2MoeConfig, Qwen3Config

CONFIGS = {
    # facebook/opt-125m
    "opt-125m": OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                          vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
                          do_layer_norm_before=True, architectures=["OPTForCausalLM"], torch_dtype="bfloat16"),
    # google/gemma-3-270m
    "gemma-3-270m": Gemma3TextConfig(hidden_size=640, num_hidden_layers=18, intermediate_size=2048,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                     vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
                                     query_pre_attn_scalar=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                     layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                                  for i in range(18)],
                                     architectures=["Gemma3ForCausalLM"], torch_dtype="bfloat16"),
    # a small Mixtral: 8 experts, top-2, ~0.5 B parameters of which ~0.15 B are active per token
    "mixtral-small": MixtralConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
                                   num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                   num_experts_per_tok=2, vocab_size=49152, max_position_embeddings=4096,
                                   architectures=["MixtralForCausalLM"], torch_dtype="bfloat16"),
    # a small Qwen2-MoE (Qwen1.5-MoE-A2.7B's layout at a quarter of its width): 16 experts, top-4, and a shared
    # expert of four experts' width with its sigmoid gate in every layer; ~0.2 B parameters, ~0.09 B active per token
    "qwen2-moe-small": Qwen2MoeConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
                                      moe_intermediate_size=352, shared_expert_intermediate_size=1408,
                                      num_experts=16, num_experts_per_tok=4, num_attention_heads=8,
                                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                                      architectures=["Qwen2MoeForCausalLM"], torch_dtype="bfloat16"),
    # Qwen/Qwen3-0.6B: per-head q/k norms, head_dim 128 (16 query heads of 128 on a hidden size of 1024)
    "qwen3-0.6b": Qwen3Config(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                              rope_theta=1_000_000.0, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"],
                              torch_dtype="bfloat16"),
}


def main() -> None:
    out = Path(sys.argv[1])
    tokenizer = Path(sys.argv[2] if len(sys.argv) > 2 else ".cache/smollm2-135m-instruct-hf")
    for name, config in CONFIGS.items():
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(target)
        for f in tokenizer.glob("*token*"):
            shutil.copy(f, target / f.name)
        print(target)


if __name__ == "__main__":
    main()
