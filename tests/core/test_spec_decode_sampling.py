"""With sampling, speculative decoding must not change the output distribution: rejection sampling accepts a
draft with probability min(1, p/q) and otherwise draws from normalize(max(0, p - q)), so every token is
distributed as the target's p. Checked on a 16-token vocabulary, against the exact per-position marginals
computed with transformers (after the same temperature and top-k), with a chi-square test. A wrong rule (e.g.
drawing from p instead of the residual after a rejection, or accepting every n-gram draft) fails it."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free

VOCAB = 16
NUM_SAMPLES = 1500
NUM_TOKENS = 4


def _tiny_vocab_model(tmp_path_factory, name: str, seed: int, base: str | None = None) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if base is None:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config)
        scale = 0.12
    else:  # the base model plus noise: a draft close to the target, with a different q
        model = AutoModelForCausalLM.from_pretrained(base)
        scale = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                if base is None:
                    param.normal_(0, scale)
                    if name.endswith("o_proj.weight"):
                        # Attention adds nothing: a bigram model, whose next token depends on the current one
                        # only, so the prompt below makes n-gram drafts the target's likely tokens (and rules
                        # that mishandle accepted or rejected drafts show). The greedy tests cover the KV cache.
                        param.zero_()
                else:
                    param.add_(torch.randn(param.shape) * 0.08)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return _tiny_vocab_model(tmp_path_factory, "vocab16_target", 7)


@pytest.fixture(scope="module")
def draft(tmp_path_factory, target):
    return _tiny_vocab_model(tmp_path_factory, "vocab16_draft", 8, base=target)


def _chain_prompt(path: str) -> list[int]:
    """Every token, each first seen followed by its most likely successor: greedy chains from each token not yet
    seen. The n-gram proposer (n = 1) then drafts the target's likeliest next tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        successor = model(torch.arange(VOCAB)[:, None]).logits[:, -1].argmax(-1).tolist()
    prompt: list[int] = []
    for start in range(VOCAB):
        token = start
        while token not in prompt:
            prompt.append(token)
            token = successor[token]
        prompt.append(token)
    return prompt


@pytest.fixture(scope="module")
def prompt(target):
    return _chain_prompt(target)


def _exact_marginals(path: str, prompt: list[int], temperature: float, top_k: int) -> list[torch.Tensor]:
    """The exact distribution of each of the first NUM_TOKENS output tokens (float64), enumerating every
    earlier continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()

    def next_probs(contexts: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c for c in contexts])).logits[:, -1].double() / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1)

    marginals = []
    prefixes, weights = [[]], torch.ones(1, dtype=torch.float64)
    for _ in range(NUM_TOKENS):
        probs = next_probs(prefixes)  # [prefixes, vocab]
        marginals.append((weights[:, None] * probs).sum(0))
        joint = weights[:, None] * probs
        prefixes = [p + [t] for p, t in itertools.product(prefixes, range(VOCAB))]
        weights = joint.reshape(-1)
    return marginals


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson's chi-square against ``probs`` at significance 0.001 (categories with expected count < 5 are
    pooled); the quantile from the Wilson-Hilferty approximation."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)]) if small.any() else expected
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.09  # the normal 0.999 quantile
    limit = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat < limit, stat, limit


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_distribution_equals_targets(target, draft, prompt, method):
    temperature, top_k = (0.7, 0) if method == "ngram" else (0.9, 10)
    config = ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 1}
              if method == "ngram" else {"model": draft, "num_speculative_tokens": 2})
    llm = LLM(target, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0,
              speculative_config=config, max_num_seqs=NUM_SAMPLES)
    # n samples of one prompt (its prefill computed once), each with its own seeded generator.
    params = SamplingParams(n=NUM_SAMPLES, temperature=temperature, top_k=top_k, seed=0, max_tokens=NUM_TOKENS,
                            ignore_eos=True, detokenize=False)
    (output,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    tokens = torch.tensor([c.token_ids for c in output.outputs])
    assert tokens.shape == (NUM_SAMPLES, NUM_TOKENS)
    spec = llm.llm_engine.get_stats().spec_decoding
    assert spec.num_drafts >= NUM_SAMPLES and spec.num_draft_tokens // 10 < spec.num_accepted_tokens
    assert_all_blocks_free(llm)
    for position, probs in enumerate(_exact_marginals(target, prompt, temperature, top_k)):
        counts = torch.bincount(tokens[:, position], minlength=VOCAB).double()
        ok, stat, limit = _chi_square_ok(counts, probs)
        assert ok, f"token {position}: chi-square {stat:.1f} > {limit:.1f}; counts {counts.tolist()}, " \
                   f"expected {(probs * NUM_SAMPLES).round().tolist()}"
