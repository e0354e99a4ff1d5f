"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers on tiny random models."""

from __future__ import annotations

import pytest

from tests.models.family_checks import BATCH_SHAPES, check_bfloat16, check_float32

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
              max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                         sliding_window=None)


def qwen2_moe_config():
    from transformers import Qwen2MoeConfig

    # Layer 0 dense (mlp_only_layers), layer 1 sparse with the shared expert; top-2 of 6 without renormalising.
    return Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                          decoder_sparse_step=1)


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True, head_dim=32, decoder_sparse_step=1)


CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config, "qwen3_moe": qwen3_moe_config}


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_moe_float32(tiny_model_dir, family, shape):
    check_float32(tiny_model_dir(family, CONFIGS[family]()), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_moe_bfloat16(tiny_model_dir, family, shape):
    check_bfloat16(tiny_model_dir(family, CONFIGS[family]()), shape)
