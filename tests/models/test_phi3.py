"""Phi-3 against transformers: fused qkv/gate_up checkpoints, partial rotary, LongRoPE (``longrope`` and its older
name ``su``) and the sliding window, on tiny random models in float32 and bf16 — through the shared harness over
every batch shape, and decoding across LongRoPE's original window against transformers' own generation."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import _hf_model
from tests.core.test_greedy_equality_bf16 import TIE_STEPS, _bf16_step
from tests.models.family_checks import (BATCH_SHAPES, LOGPROB_ATOL, MAX_TOKENS, check_bfloat16, check_float32,
                                        family_prompts, run_pagoda)

# Shorter than the longest prompts plus their continuations (40 + 16 tokens) but not shorter than any prompt, so
# prompts rotate with the short factors and decoding crosses into the long ones — the regime where pagoda's
# per-position choice and transformers' per-call one agree (see pagoda.models.layers.longrope_freqs).
ORIGINAL_WINDOW = 40
SHORT = [1.0, 1.3, 1.9, 2.7]
LONG = [1.0, 4.0, 11.0, 29.0]


def phi3_config(**overrides):
    from transformers import Phi3Config

    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    values.update(overrides)
    return Phi3Config(**values)


def longrope_config():
    """LongRoPE with both factor sets in play (decoding crosses the original window), half of each head rotated."""
    return phi3_config(original_max_position_embeddings=ORIGINAL_WINDOW, partial_rotary_factor=0.5,
                       rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})


def su_config():
    """The ``su`` spelling of early long-context Phi-3 checkpoints, an explicit attention factor, full rotary and a
    24-token sliding window; its original window holds every sequence of the harness, so transformers'
    teacher-forced passes (the harness's logprob and tie references) rotate as its generation does."""
    return phi3_config(original_max_position_embeddings=64, sliding_window=24,
                       rope_scaling={"type": "su", "short_factor": SHORT * 2, "long_factor": LONG * 2,
                                     "attention_factor": 1.25})


@functools.cache
def hf_generate(path: str, dtype: torch.dtype) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy continuations and the float32 logits [MAX_TOKENS, vocab] each token was picked from,
    from its own incremental generation (prompt in one call, then token by token with its KV cache). With LongRoPE
    that is the reference: transformers picks the factors per call, so a teacher-forced pass over a sequence longer
    than the original window (the harness's logprob and tie reference) rotates every position with the long
    factors, unlike its generation."""
    model = _hf_model(path, dtype)
    prompts = crossing_prompts()
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            row, steps = [], []
            for _ in range(MAX_TOKENS):
                steps.append(out.logits[0, -1].float())
                row.append(int(steps[-1].argmax()))
                out = model(torch.tensor([[row[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(row)
            logits.append(torch.stack(steps))
    return tokens, logits


def crossing_prompts() -> list[list[int]]:
    prompts = family_prompts()
    assert max(map(len, prompts)) <= ORIGINAL_WINDOW < max(map(len, prompts)) + MAX_TOKENS
    return prompts


# The rope table is indexed by position, so the batch shapes that matter past the window are one call against
# many (the harness config above covers every shape).
CROSSING_SHAPES = ["default", "chunked_prefill"]


@pytest.mark.parametrize("shape", CROSSING_SHAPES)
def test_phi3_longrope_float32(tiny_model_dir, shape):
    """float32 greedy tokens and logprobs equal transformers' generation, decoding across the original window."""
    path = tiny_model_dir("phi3_longrope", longrope_config())
    prompts = crossing_prompts()
    expected, logits = hf_generate(path, torch.float32)
    _, together, alone = run_pagoda(path, "float32", shape, prompts, logprobs=0)
    assert [o.outputs[0].token_ids for o in together] == expected
    assert [o.outputs[0].token_ids for o in alone] == expected[:3]
    for out, steps, tokens in zip(together, logits, expected):
        want = torch.log_softmax(steps, -1)[torch.arange(MAX_TOKENS), torch.tensor(tokens)]
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)])
        assert torch.allclose(got, want, atol=LOGPROB_ATOL), f"logprobs differ by {(got - want).abs().max():.2e}"


def assert_equal_up_to_generation_ties(ours: list[list[int]], expected: list[list[int]],
                                       logits: list[torch.Tensor]) -> int:
    """Tokens equal until the first bf16 tie in transformers' generation logits; returns how many were compared."""
    compared = 0
    for got, want, steps in zip(ours, expected, logits):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        compared += len(want) if first is None else first + 1
        if first is not None:
            top, picked = steps[first].max().item(), steps[first, got[first]].item()
            assert top - picked <= TIE_STEPS * _bf16_step(top), (
                f"diverges at token {first}: transformers picks {want[first]} (logit {top:.4f}), pagoda "
                f"{got[first]} (logit {picked:.4f}) — not a bf16 tie")
    return compared


@pytest.mark.parametrize("shape", CROSSING_SHAPES)
def test_phi3_longrope_bfloat16(tiny_model_dir, shape):
    """bf16 on the native paths: transformers' bf16 generation up to ties, decoding across the original window."""
    path = tiny_model_dir("phi3_longrope", longrope_config())
    prompts = crossing_prompts()
    expected, logits = hf_generate(path, torch.bfloat16)
    _, together, alone = run_pagoda(path, "bfloat16", shape, prompts)
    compared = assert_equal_up_to_generation_ties([o.outputs[0].token_ids for o in together], expected, logits)
    assert compared >= 0.5 * MAX_TOKENS * len(prompts), f"only {compared} tokens compared before a tie"
    assert_equal_up_to_generation_ties([o.outputs[0].token_ids for o in alone], expected[:3], logits[:3])


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_phi3_float32(tiny_model_dir, shape):
    check_float32(tiny_model_dir("phi3_su", su_config()), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_phi3_bfloat16(tiny_model_dir, shape):
    check_bfloat16(tiny_model_dir("phi3_su", su_config()), shape)


def test_phi3_saved_config_keeps_longrope(tiny_model_dir):
    """The checkpoint really holds fused projections and LongRoPE (so the tests above exercise them)."""
    import json
    import os

    from safetensors import safe_open

    path = tiny_model_dir("phi3_su", su_config())
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == LONG * 2
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names


def test_unknown_rope_type_names_supported_ones():
    from pagoda.models.layers import RotaryEmbedding

    config = phi3_config()
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="'dynamic' is not supported; supported: .*longrope, su"):
        RotaryEmbedding(config, 16, 64, None)
