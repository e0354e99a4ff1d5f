"""Greedy output in bfloat16 on the native paths equals transformers' bfloat16 greedy output, up to exact ties.

In bf16 two implementations that round differently (pagoda's native kernels sum in float32 and round once;
transformers rounds after each op) can pick different tokens where the two best logits are within a few bf16
steps of each other — a tie at bf16's resolution — and from there the continuations differ. So the tokens must be
equal up to the first such tie, and a divergence anywhere else fails: at the first differing token, transformers'
bf16 logits (teacher-forced on the common prefix) must rank pagoda's token within a few bf16 steps of its own
choice. The batch shapes are those of the float32 equality test.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_KINDS, _hf_model, assert_all_blocks_free, hf_greedy
from tests.core.test_greedy_equality import BATCH_SHAPES

MAX_TOKENS = 24
TIE_STEPS = 6  # bf16 steps of the top logit within which two tokens count as tied


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 1000) for _ in range(33)]
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in (1, 5, 17, 40)] + [shared + [5, 6], shared]


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            path = tiny_model_dir(kind)
            prompts = _prompts(TINY_KINDS.index(kind))
            cache[kind] = (path, prompts, hf_greedy(path, prompts, MAX_TOKENS, torch.bfloat16))
        return cache[kind]

    return get


def _bf16_step(value: float) -> float:
    """The spacing of bf16 values around ``value`` (8 significant bits)."""
    return 2.0 ** (torch.tensor(abs(value) or 1.0).log2().floor().item() - 7)


def assert_equal_up_to_ties(path: str, prompts, ours, expected) -> int:
    """Tokens equal until the first bf16 tie in transformers' own logits; returns how many tokens were compared."""
    model = _hf_model(path, torch.bfloat16)
    compared = 0
    for prompt, got, want in zip(prompts, ours, expected):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        compared += len(want) if first is None else first + 1
        if first is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + want[:first]])).logits[0, -1].float()
        top, picked = logits.max().item(), logits[got[first]].item()
        assert top - picked <= TIE_STEPS * _bf16_step(top), (
            f"prompt of {len(prompt)} tokens diverges at token {first}: transformers picks {want[first]} "
            f"(logit {top:.4f}), pagoda {got[first]} (logit {picked:.4f}) — not a bf16 tie")
    return compared


@pytest.mark.parametrize("shape", list(BATCH_SHAPES))
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_bf16_greedy_matches_transformers_bf16(kind, shape, references):
    path, prompts, expected = references(kind)
    llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0,
              **BATCH_SHAPES[shape])
    native = [c.op for c in llm.llm_engine.config.ops.choices.values() if c.chosen != "torch"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in together]
    compared = assert_equal_up_to_ties(path, prompts, ours, expected)
    # Ties are rare: most of the reference's tokens are compared, not skipped after an early divergence.
    assert compared >= 0.5 * MAX_TOKENS * len(prompts), f"only {compared} tokens compared (native ops: {native})"
    # Alone, too (in bf16 a request alone may take other kernels than in a batch — the linear op changes kernels
    # with the number of rows on AMX CPUs — so it is held to the reference, not to its batched self).
    alone = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts[:3]]
    assert_equal_up_to_ties(path, prompts[:3], alone, expected[:3])
    assert_all_blocks_free(llm)
