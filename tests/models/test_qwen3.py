"""Qwen3 (per-head q/k RMSNorm, explicit head_dim, attention bias) against transformers on tiny random models."""

from __future__ import annotations

import pytest

from tests.models.family_checks import BATCH_SHAPES, check_bfloat16, check_float32


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    # head_dim 32 with 4 heads: the projections are wider than hidden_size, as in the real checkpoints.
    return Qwen3Config(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=1024,
                                 attention_bias=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
                          **overrides})


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_qwen3_float32(tiny_model_dir, shape):
    check_float32(tiny_model_dir("qwen3", qwen3_config()), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_qwen3_bfloat16(tiny_model_dir, shape):
    check_bfloat16(tiny_model_dir("qwen3", qwen3_config()), shape)
