"""GGUF models through the whole engine (``pagoda.LLM``) against transformers reading the same file.

transformers dequantizes the GGUF to float32 and runs its own Llama; we keep the weights quantized and run
pagoda's model with the GGUF kernels, in float32 too. Both compute with the same dequantized weight values, so
the remaining difference is float32 rounding in a different order of operations.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import hf_gguf_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
NUM_TOKENS = 32
# max |logprob difference| of the chosen tokens: float32 rounding through 30 layers stays far below this,
# while any layout or dequantization error (a wrong block, an unpermuted head) moves logprobs by whole units.
LOGPROB_TOL = 2e-2


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and the log-probabilities of the chosen tokens, one token at a time."""
    ids = torch.tensor([prompt_ids])
    tokens, logprobs = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(num_tokens):
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def _llm(path):
    from pagoda import LLM

    return LLM(model=path, dtype="float32", kv_cache_memory_bytes=1 << 26, max_model_len=512)


def _greedy(llm, prompts_ids):
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts_ids], params)
    results = []
    for out in outs:
        completion = out.outputs[0]
        lps = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
        results.append((list(completion.token_ids), lps))
    return results


def _compare(llm, hf_model, prompts_ids):
    ours = _greedy(llm, prompts_ids)
    for ids, (tokens, logprobs) in zip(prompts_ids, ours):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, ids, NUM_TOKENS)
        assert tokens == ref_tokens
        worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert worst < LOGPROB_TOL, f"chosen-token logprobs differ by up to {worst:.2e}"


@pytest.fixture(scope="module")
def smollm_llm(smollm_gguf):
    return _llm(smollm_gguf)


@pytest.mark.slow
def test_smollm_greedy_equals_transformers(smollm_llm, smollm_hf_model):
    tokenizer = smollm_llm.get_tokenizer()
    _compare(smollm_llm, smollm_hf_model, [tokenizer.encode(p) for p in PROMPTS])


@pytest.mark.slow
def test_smollm_chat_answers_paris(smollm_gguf):
    """The default configuration (the platform's dtype: bfloat16 on CPU, so the int4 kernels)."""
    from pagoda import LLM, SamplingParams

    llm = LLM(model=smollm_gguf, kv_cache_memory_bytes=1 << 26, max_model_len=512)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0.0, max_tokens=30))
    assert "Paris" in out[0].outputs[0].text


def test_tiny_greedy_equals_transformers(tiny_gguf):
    llm = _llm(tiny_gguf)
    tokenizer = llm.get_tokenizer()
    _compare(llm, hf_gguf_model(tiny_gguf), [tokenizer.encode(p) for p in PROMPTS[:2]])
