"""Gemma, Gemma 2 and Gemma 3 (text) against transformers on tiny random checkpoints.

The tiny configs make every Gemma feature bite within the harness's prompts (up to 40 tokens): norm weights are
random (so ``1 + w`` differs from ``w``), Gemma 2 soft-caps its attention and final logits at small caps and
interleaves a sliding window of 8 with global layers, Gemma 3 has one local and one global layer with their own
rotary bases (the global one linearly scaled) and q/k norms. ``test_reference_applies_every_feature`` checks that
transformers itself computes each of them on these configs, so the equality tests hold pagoda to all of them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM
from tests.models.family_checks import BATCH_SHAPES, check_bfloat16, check_float32

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


def _configs():
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig, SiglipVisionConfig

    gemma3_text = dict(COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return {
        "gemma": GemmaConfig(**COMMON, head_dim=32),
        # Layer 0 slides (window 8), layer 1 is global; both caps are small enough to change the numbers.
        "gemma2": Gemma2Config(**COMMON, head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                               attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
        "gemma3": Gemma3TextConfig(**gemma3_text),
        # The multimodal checkpoint (gemma-3-4b and larger): its text model, with a tiny vision tower beside it.
        "gemma3_mm": Gemma3Config(text_config=gemma3_text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                  image_token_index=1000, boi_token_index=1001, eoi_token_index=1002),
    }


_DIRS: dict[str, str] = {}


@pytest.fixture
def gemma_dir(tiny_model_dir):
    """``gemma_dir(kind)``: the tiny checkpoint, its RMSNorm weights made random (the fixture leaves 1-d weights at
    their zero initialisation, under which ``1 + w`` and ``w`` would be indistinguishable)."""
    def make(kind: str) -> str:
        if kind not in _DIRS:
            path = tiny_model_dir(kind, _configs()[kind])
            tensors = load_file(f"{path}/model.safetensors")
            gen = torch.Generator().manual_seed(7)
            for name, tensor in tensors.items():
                if name.endswith("norm.weight"):
                    tensors[name] = (torch.randn(tensor.shape, generator=gen) * 0.3).to(tensor.dtype)
            save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
            _DIRS[kind] = path
        return _DIRS[kind]

    return make


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_float32(gemma_dir, kind, shape):
    check_float32(gemma_dir(kind), shape)


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_bfloat16(gemma_dir, kind, shape):
    check_bfloat16(gemma_dir(kind), shape)


def _hf_logits(path: str, prompt: list[int], **overrides) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


@pytest.mark.parametrize("kind,overrides", [
    ("gemma2", {"sliding_window": 4096}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma3", {"sliding_window": 4096}),
])
def test_reference_applies_every_feature(gemma_dir, kind, overrides):
    """transformers' logits on a 40-token prompt change when a feature is switched off, so the equality tests
    above really compare it (its default attention for Gemma 2 is eager, which soft-caps)."""
    path = gemma_dir(kind)
    prompt = list(range(3, 43))
    assert not torch.allclose(_hf_logits(path, prompt), _hf_logits(path, prompt, **overrides), atol=1e-4)


def test_engine_plans_each_window_and_soft_caps(gemma_dir):
    llm = LLM(gemma_dir("gemma2"), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)
    config = llm.llm_engine.config
    assert config.attention.layer_windows == (8, None)
    assert config.attention.windows() == [None, 8]
    assert config.attention.logits_soft_cap == 3.0
    assert config.model.text_config.final_logit_softcapping == 5.0


@pytest.mark.parametrize("check", [check_float32, check_bfloat16], ids=["float32", "bfloat16"])
def test_multimodal_gemma3_checkpoint_runs_its_text_model(gemma_dir, check):
    """A Gemma3ForConditionalGeneration checkpoint (language model under language_model.*, a vision tower beside
    it) generates from text prompts as transformers' multimodal model does."""
    check(gemma_dir("gemma3_mm"), "default")


def test_gemma3_attention_soft_cap_is_an_error_naming_what_is_supported(tiny_model_dir):
    """transformers' Gemma 3 never applies attn_logit_softcapping: a checkpoint that sets it is refused, not run
    with numbers nobody can check."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=8, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping=None"):
        LLM(tiny_model_dir("gemma3_softcap", config), dtype="float32", skip_tokenizer_init=True,
            kv_cache_memory_bytes=1 << 24)
