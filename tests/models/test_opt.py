"""OPT against transformers on tiny random checkpoints: the pre-norm layout (125m and larger) and the post-norm one
with ``word_embed_proj_dim`` below ``hidden_size`` (350m), in float32 and bf16 over every batch shape; checkpoints
named without ``model.``; vLLM's quickstart model id from the Hugging Face cache; an opt-125m-shaped model with
dummy weights; unsupported activations as errors."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.models.checkpoint_variants import (config_only_dir, pagoda_greedy, randomize_vectors,
                                              rewrite_checkpoint)
from tests.models.family_checks import BATCH_SHAPES, check_bfloat16, check_float32

TINY = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
KINDS = {
    # 125m's layout: LayerNorm before attention and MLP, a final LayerNorm, ReLU, biases, tied head
    "opt_pre_norm": dict(word_embed_proj_dim=64, do_layer_norm_before=True),
    # 350m's layout: LayerNorm after each residual add, no final norm, embeddings in a narrower width
    "opt_post_norm_projected": dict(word_embed_proj_dim=32, do_layer_norm_before=False),
}
# facebook/opt-125m's config.json (its shape; the weights come from load_format=dummy)
OPT_125M = dict(architectures=["OPTForCausalLM"], model_type="opt", hidden_size=768, ffn_dim=3072,
                num_hidden_layers=12, num_attention_heads=12, vocab_size=50272, max_position_embeddings=2048,
                word_embed_proj_dim=768, do_layer_norm_before=True, activation_function="relu", bos_token_id=2,
                eos_token_id=2, pad_token_id=1, torch_dtype="float16", prefix="</s>")


def opt_dir(tiny_model_dir, kind: str) -> str:
    from transformers import OPTConfig

    return randomize_vectors(tiny_model_dir(kind, OPTConfig(**TINY, **KINDS[kind])))


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_opt_float32(tiny_model_dir, kind, shape):
    check_float32(opt_dir(tiny_model_dir, kind), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_opt_bfloat16(tiny_model_dir, kind, shape):
    check_bfloat16(opt_dir(tiny_model_dir, kind), shape)


def test_opt_without_biases_or_norm_weights_and_untied_head(tiny_model_dir):
    """The less common switches: ``enable_bias=False``, ``layer_norm_elementwise_affine=False``, an untied LM head
    and GELU."""
    from transformers import OPTConfig

    config = OPTConfig(**TINY, **KINDS["opt_pre_norm"], enable_bias=False, layer_norm_elementwise_affine=False,
                       tie_word_embeddings=False, activation_function="gelu")
    check_float32(tiny_model_dir("opt_switches", config), "default")


def test_opt_checkpoint_saved_from_the_bare_decoder(tiny_model_dir, tmp_path):
    """facebook/opt-* files name tensors ``decoder.*`` (no ``model.``) and may carry the tied ``lm_head.weight``."""
    from safetensors.torch import load_file

    source = opt_dir(tiny_model_dir, "opt_post_norm_projected")
    head = load_file(f"{source}/model.safetensors")["model.decoder.embed_tokens.weight"]
    bare = rewrite_checkpoint(source, tmp_path / "bare", lambda n: n.removeprefix("model."),
                              extra={"lm_head.weight": head.clone()})
    assert pagoda_greedy(bare) == pagoda_greedy(source)  # the source copy is held to transformers above


def _hub_cache_with_opt(root, tiny_model_dir) -> None:
    """A Hugging Face cache holding a tiny OPT as ``facebook/opt-125m`` (``decoder.*`` names), with a byte-level
    BPE tokenizer as OPT's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    snapshot = root / "models--facebook--opt-125m" / "snapshots" / "0123456789abcdef"
    (root / "models--facebook--opt-125m" / "refs").mkdir(parents=True)
    (root / "models--facebook--opt-125m" / "refs" / "main").write_text("0123456789abcdef")
    rewrite_checkpoint(opt_dir(tiny_model_dir, "opt_pre_norm"), snapshot, lambda n: n.removeprefix("model."))
    bpe = ByteLevelBPETokenizer()
    text = ["Hello, my name is", "The president of the United States is", "The capital of France is",
            "The future of AI is"] * 20
    bpe.train_from_iterator(text, vocab_size=600, min_frequency=1, special_tokens=["<pad>", "</s>", "<s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(snapshot)


def test_vllm_quickstart_facebook_opt_125m(tiny_model_dir, tmp_path, monkeypatch):
    """vLLM's quickstart, verbatim, with ``facebook/opt-125m`` found in the Hugging Face cache."""
    import huggingface_hub.constants

    _hub_cache_with_opt(tmp_path, tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is",
               "The future of AI is"]
    llm = LLM(model="facebook/opt-125m")
    outputs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95), use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    assert all(len(o.outputs[0].token_ids) > 0 and isinstance(o.outputs[0].text, str) for o in outputs)


def test_opt_125m_shape_with_dummy_weights(tmp_path):
    """The benchmark's configuration (opt-125m's shape, random weights, bf16), with two of its twelve layers to keep
    the test quick: every layer has the same shape."""
    (tmp_path / "config.json").write_text(json.dumps({**OPT_125M, "num_hidden_layers": 2}))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              kv_cache_memory_bytes=1 << 26, seed=0)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": [2, 100, 200, 300]}, {"prompt_token_ids": [2] * 9}], params,
                           use_tqdm=False)
    for out in outputs:
        assert len(out.outputs[0].token_ids) == 4
        assert all(torch.isfinite(torch.tensor(step[t].logprob))
                   for step, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids))


def test_opt_unsupported_activation_is_an_error(tmp_path):
    from transformers import OPTConfig

    path = config_only_dir(OPTConfig(**TINY, activation_function="swish", architectures=["OPTForCausalLM"]),
                           tmp_path)
    with pytest.raises(ValueError, match=r"activation_function 'swish' is not supported; supported: relu, gelu"):
        LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)
