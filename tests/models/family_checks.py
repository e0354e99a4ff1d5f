"""The checks every model family is held to, against transformers on a tiny random checkpoint.

* float32: greedy tokens equal transformers' token for token in each batch shape of the engine tests (all
  together, each alone, chunked prefill, prefix-cache hits, preemption), and each sampled token's logprob equals
  transformers' log-softmax within ``LOGPROB_ATOL``;
* bfloat16 on the native paths: equal up to bf16 ties (see :mod:`tests.core.test_greedy_equality_bf16`).

A family's test module builds its tiny configs and parametrizes over ``BATCH_SHAPES``::

    @pytest.mark.parametrize("shape", list(BATCH_SHAPES))
    def test_opt_float32(tiny_model_dir, shape):
        check_float32(tiny_model_dir("opt", OPTConfig(...)), shape)
"""

from __future__ import annotations

import random

import torch

from pagoda import LLM, SamplingParams
from tests.conftest import _hf_model, assert_all_blocks_free, hf_greedy
from tests.core.test_greedy_equality import BATCH_SHAPES
from tests.core.test_greedy_equality_bf16 import assert_equal_up_to_ties

__all__ = ["BATCH_SHAPES", "MAX_TOKENS", "LOGPROB_ATOL", "family_prompts", "check_float32", "check_bfloat16",
           "run_pagoda"]

MAX_TOKENS = 16
LOGPROB_ATOL = 2e-3
_REFERENCES: dict[tuple[str, str], list[list[int]]] = {}


def family_prompts(vocab: int = 1000, seed: int = 0) -> list[list[int]]:
    """Lone prompts of 1, 5, 17 and 40 tokens, and three sharing a 33-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(33)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 40)]
    return prompts + [shared + [5, 6], shared + [7], shared]


def _reference(path: str, prompts: list[list[int]], dtype: torch.dtype) -> list[list[int]]:
    key = (path, str(dtype))
    if key not in _REFERENCES:
        _REFERENCES[key] = hf_greedy(path, prompts, MAX_TOKENS, dtype)
    return _REFERENCES[key]


def run_pagoda(path: str, dtype: str, shape: str, prompts: list[list[int]], logprobs: int | None = None,
               **engine_args):
    """Generate greedily for ``prompts`` together, then the first three alone; returns (llm, together, alone)."""
    llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0,
              **{**BATCH_SHAPES[shape], **engine_args})
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                            logprobs=logprobs)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_all_blocks_free(llm)
    alone = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts[:3]]
    assert_all_blocks_free(llm)
    if shape == "tiny_kv_cache_preemption":
        assert llm.llm_engine.get_stats().num_preemptions_total > 0, "the tiny cache was meant to force preemption"
    return llm, together, alone


def check_float32(path: str, shape: str, vocab: int = 1000, **engine_args) -> None:
    prompts = family_prompts(vocab)
    expected = _reference(path, prompts, torch.float32)
    _, together, alone = run_pagoda(path, "float32", shape, prompts, logprobs=0, **engine_args)
    assert [o.outputs[0].token_ids for o in together] == expected
    assert [o.outputs[0].token_ids for o in alone] == expected[:3]
    # Logprobs of the sampled tokens: transformers' log-softmax over the teacher-forced sequence.
    model = _hf_model(path, torch.float32)
    for prompt, out in zip(prompts, together):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        want = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)])
        assert torch.allclose(got, want, atol=LOGPROB_ATOL), f"logprobs differ by {(got - want).abs().max():.2e}"


def check_bfloat16(path: str, shape: str, vocab: int = 1000, **engine_args) -> None:
    prompts = family_prompts(vocab, seed=1)
    expected = _reference(path, prompts, torch.bfloat16)
    llm, together, alone = run_pagoda(path, "bfloat16", shape, prompts, **engine_args)
    ours = [o.outputs[0].token_ids for o in together]
    compared = assert_equal_up_to_ties(path, prompts, ours, expected)
    assert compared >= 0.5 * MAX_TOKENS * len(prompts), f"only {compared} tokens compared before a tie"
    assert_equal_up_to_ties(path, prompts[:3], [o.outputs[0].token_ids for o in alone], expected[:3])
