"""GPT-2 against transformers on a tiny random checkpoint in float32 and bf16 over every batch shape; checkpoints
named without ``transformer.`` and carrying the causal-mask buffers (as the original ``gpt2`` files); dummy
weights; unsupported config features as errors naming them."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.models.checkpoint_variants import (config_only_dir, pagoda_greedy, randomize_vectors,
                                              rewrite_checkpoint)
from tests.models.family_checks import BATCH_SHAPES, check_bfloat16, check_float32

TINY = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=1024, n_positions=1024, bos_token_id=1,
            eos_token_id=2)


def gpt2_dir(tiny_model_dir) -> str:
    from transformers import GPT2Config

    return randomize_vectors(tiny_model_dir("gpt2", GPT2Config(**TINY)))


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_gpt2_float32(tiny_model_dir, shape):
    check_float32(gpt2_dir(tiny_model_dir), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
def test_gpt2_bfloat16(tiny_model_dir, shape):
    check_bfloat16(gpt2_dir(tiny_model_dir), shape)


def test_gpt2_untied_head_and_relu(tiny_model_dir):
    from transformers import GPT2Config

    config = GPT2Config(**{**TINY, "n_inner": None}, tie_word_embeddings=False, activation_function="relu")
    check_float32(randomize_vectors(tiny_model_dir("gpt2_untied_relu", config)), "default")


def test_gpt2_checkpoint_saved_from_the_bare_model(tiny_model_dir, tmp_path):
    """The original gpt2 files: ``h.0.attn.c_attn.weight`` … without ``transformer.``, plus each layer's causal-mask
    buffers (``attn.bias``, ``attn.masked_bias``), which are not weights."""
    mask = torch.tril(torch.ones(1024, 1024, dtype=torch.bool)).view(1, 1, 1024, 1024)  # n_positions square
    buffers = {f"h.{i}.attn.{name}": value for i in range(TINY["n_layer"])
               for name, value in (("bias", mask.clone()), ("masked_bias", torch.tensor(-1e4)))}
    source = gpt2_dir(tiny_model_dir)
    bare = rewrite_checkpoint(source, tmp_path / "bare", lambda n: n.removeprefix("transformer."), extra=buffers)
    assert pagoda_greedy(bare) == pagoda_greedy(source)  # the source copy is held to transformers above


def test_gpt2_dummy_weights(tiny_model_dir):
    llm = LLM(gpt2_dir(tiny_model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              kv_cache_memory_bytes=1 << 24, seed=0)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("feature", [dict(scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True),
                                     dict(add_cross_attention=True), dict(scale_attn_weights=False)],
                         ids=lambda f: next(iter(f)))
def test_gpt2_unsupported_config_features_are_errors(tmp_path, feature):
    from transformers import GPT2Config

    path = config_only_dir(GPT2Config(**TINY, **feature, architectures=["GPT2LMHeadModel"]), tmp_path)
    name = next(iter(feature))
    with pytest.raises(ValueError, match=rf"{name}.* not supported; supported: GPT-2 with"):
        LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)


def test_gpt2_unsupported_activation_is_an_error(tmp_path):
    from transformers import GPT2Config

    path = config_only_dir(GPT2Config(**TINY, activation_function="silu", architectures=["GPT2LMHeadModel"]),
                           tmp_path)
    with pytest.raises(ValueError, match=r"activation_function 'silu' is not supported; supported: relu, gelu"):
        LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)
