"""Whole-engine check of the backends that run here: greedy output through TRITON_ATTN (Triton's interpreter
on the CPU) equals transformers', with prefix-cache hits, chunked prefill and mixed batches along the way."""

from __future__ import annotations

import importlib.util
import random

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import hf_greedy

MAX_TOKENS = 8
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: pip install pagoda-llm[cuda]")


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 1000) for _ in range(20)]
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in (3, 19)] + [shared + [5], shared + [6, 7]]


# llama: head size 16, chunked prefill under a 9-token budget; mistral: head size 32, whole prompts. Both GQA 4:2.
@pytest.mark.parametrize("kind, engine_args", [("llama", {"max_num_batched_tokens": 9}), ("mistral", {})],
                         ids=["llama-chunked", "mistral"])
def test_triton_attn_greedy_matches_transformers(tiny_model_dir, kind, engine_args):
    path = tiny_model_dir(kind)
    prompts = _prompts()
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22, seed=0,
              attention_backend="TRITON_ATTN", **engine_args)
    assert llm.llm_engine.config.attention_backend.name == "TRITON_ATTN"
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, prompts, MAX_TOKENS)
