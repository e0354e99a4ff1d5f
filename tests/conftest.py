"""Shared fixtures: tiny random Hugging Face models, the HF-format SmolLM2 copy, and the block-accounting check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("PAGODA_TEST_CACHE", REPO_ROOT / ".cache"))

TINY_KINDS = ("llama", "qwen2", "mistral", "llama3_rope")


def bundled_gguf_path() -> str:
    from pagoda.core.model_files import bundled_model_path

    return bundled_model_path()


def _tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, bos_token_id=1,
                  eos_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "llama3_rope":
        return LlamaConfig(**{**common, "num_key_value_heads": 1}, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 256})
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=32)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(kind)`` → a directory with a tiny random model of that kind (built once per session);
    ``tiny_model_dir(kind, config)`` builds it from a transformers config instead of the kinds above."""
    from transformers import AutoModelForCausalLM

    built: dict[str, str] = {}

    def make(kind: str, config=None) -> str:
        if kind not in built:
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(config if config is not None else _tiny_config(kind))
            # Larger-than-default weights make logits well separated, so greedy ties can't flip tokens.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.15)
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            model.save_pretrained(path)
            built[kind] = str(path)
        return built[kind]

    return make


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> str:
    """An HF-format float32 copy of the bundled SmolLM2-135M-Instruct (dequantized with transformers), cached in
    ``.cache/`` across sessions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = CACHE_DIR / "smollm2-135m-instruct-hf"
    if (target / "model.safetensors").exists():
        return str(target)
    gguf = Path(bundled_gguf_path())
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    tmp = target.with_suffix(".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(target)
    return str(target)


def assert_all_blocks_free(llm_or_engine) -> None:
    """Accounting is exact: with no request left, every KV block is back in the free pool."""
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    assert not engine.has_unfinished_requests()
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} blocks leaked"
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert not engine.kv_cache.req_blocks


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Reference greedy continuations from transformers (in ``dtype``, one prompt at a time, EOS not special —
    as with ``ignore_eos``): argmax of the HF forward pass, step by step with its own KV cache."""
    model = _hf_model(model_dir, dtype)
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens = []
            for _ in range(max_tokens):
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            outs.append(tokens)
    return outs


_HF_MODELS: dict[str, object] = {}  # keyed by directory and dtype


def _hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    key = f"{model_dir}:{dtype}"
    if key not in _HF_MODELS:
        _HF_MODELS[key] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return _HF_MODELS[key]
