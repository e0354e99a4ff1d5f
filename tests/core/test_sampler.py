"""The batched sampler against direct per-row computations (numpy, float64) of each stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagoda.core import logits_processing as lp
from pagoda.core.sampler import (
    Sampler,
    SamplingRequestState,
    compute_prompt_logprobs,
    make_generator,
)
from pagoda.sampling_params import SamplingParams

VOCAB = 64
NEG_INF = float("-inf")


def state(prompt=(1, 2, 3), output=(), eos=(), bad_words=(), **kwargs) -> SamplingRequestState:
    params = SamplingParams(**kwargs)
    return SamplingRequestState(
        params, list(prompt), list(output), make_generator(params.seed), set(eos), [list(w) for w in bad_words]
    )


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def processed(logits: torch.Tensor, states) -> np.ndarray:
    return Sampler().process_logits(logits.clone(), states).numpy()


# ----------------------------------------------------------------------------- logits-changing stages
def test_penalties_match_direct_computation():
    rng = np.random.default_rng(1)
    states = [
        state(prompt=[5, 6, 7, 7], output=[7, 8, 8, 8, 9], repetition_penalty=1.3),
        state(prompt=[1], output=[2, 2, 3, 40, 40, 40], frequency_penalty=0.7, presence_penalty=-0.4),
        state(prompt=[4, 9], output=[], repetition_penalty=0.8, presence_penalty=1.5),
        state(prompt=[0], output=[1, 1]),  # no penalty: untouched
        state(prompt=[], output=[], repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=1.0),
        state(prompt=[], output=[0, 0, 5], repetition_penalty=2.0, presence_penalty=1.0),
        state(prompt=[0, 3], output=[], repetition_penalty=1.7, frequency_penalty=1.0),
        state(prompt=list(rng.integers(0, VOCAB, 30)), output=list(rng.integers(0, VOCAB, 50)),
              repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2),
    ]
    logits = random_logits(len(states))
    expected = logits.numpy().astype(np.float64).copy()
    for row, s in enumerate(states):
        p = s.params
        counts = np.bincount(s.output_token_ids, minlength=VOCAB)
        for token in range(VOCAB):
            value = expected[row, token]
            if token in s.prompt_token_ids or counts[token]:
                value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
            value -= p.frequency_penalty * counts[token] + p.presence_penalty * (counts[token] > 0)
            expected[row, token] = value
    np.testing.assert_allclose(processed(logits, states), expected, rtol=1e-5, atol=1e-5)


def test_output_tensor_cache_follows_appended_tokens():
    s = state(output=[3], frequency_penalty=1.0)
    logits = torch.zeros(1, VOCAB)
    for token in [3, 4, 4] + [t % VOCAB for t in range(100)]:  # grows past the initial buffer
        s.output_token_ids.append(token)
        counts = np.bincount(s.output_token_ids, minlength=VOCAB)[:VOCAB]
        np.testing.assert_allclose(processed(logits, [s])[0], -counts)


def test_logit_bias_allowed_ids_bad_words_and_min_tokens():
    states = [
        state(logit_bias={3: 5.0, 10: -100.0}),
        state(allowed_token_ids=[4, 8, 15], logit_bias={8: 2.0}),
        # bad words: a one-token word is always banned; longer ones once their prefix ends the output.
        state(output=[20, 4, 5], bad_words=[[10], [5, 11], [4, 5, 12], [9, 13], [3, 4, 5, 14]]),
        state(output=[1, 2], min_tokens=3, stop_token_ids=[30, 31], eos=[2]),
        state(output=[1, 2, 3], min_tokens=3, stop_token_ids=[30, 31], eos=[2]),  # reached: nothing banned
        state(),
    ]
    logits = random_logits(len(states))
    raw = logits.numpy().astype(np.float64)
    expected = raw.copy()
    expected[0, 3] += 5.0
    expected[0, 10] -= 100.0
    expected[1] = NEG_INF
    expected[1, [4, 8, 15]] = raw[1, [4, 8, 15]]
    expected[1, 8] += 2.0
    expected[2, [10, 11, 12]] = NEG_INF
    expected[3, [2, 30, 31]] = NEG_INF
    np.testing.assert_allclose(processed(logits, states), expected, rtol=1e-6)


def test_min_tokens_mask_lifts_after_enough_tokens():
    s = state(min_tokens=2, stop_token_ids=[5], eos=[0], temperature=0.0)
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 0] = 10.0  # EOS is the argmax
    logits[0, 5] = 9.0
    sampler = Sampler()
    picked = []
    for _ in range(3):
        picked.append(int(sampler(logits.clone(), [s]).sampled_token_ids[0]))
        s.output_token_ids.append(picked[-1])
    assert picked[:2] != [0, 0] and 0 not in picked[:2] and 5 not in picked[:2]
    assert picked[2] == 0


# ------------------------------------------------------------------------------ random-sampling stages
@pytest.mark.parametrize("vocab, scale", [(VOCAB, 3.0), (1000, 0.3), (1000, 6.0)])
def test_temperature_min_p_top_k_top_p_match_direct_computation(vocab, scale):
    """Small and flat (the candidate search falls back to sorting) or peaked (candidates suffice)."""
    configs = [
        dict(temperature=0.7),
        dict(temperature=1.3, min_p=0.05),
        dict(temperature=0.9, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.5, top_k=10, top_p=0.6, min_p=0.01),
        dict(temperature=2.0, top_k=vocab + 10),  # larger than the vocabulary: no filtering
        dict(temperature=1.0, top_p=0.9, min_p=0.3),
        dict(temperature=0.8, top_k=3, top_p=0.99),
    ]
    states = [state(**c) for c in configs]
    logits = torch.randn(len(states), vocab, generator=torch.Generator().manual_seed(3)) * scale
    got = Sampler.shape_random_logits(logits.clone(), states).numpy()
    for row, c in enumerate(configs):
        x = logits[row].numpy().astype(np.float64) / c["temperature"]
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        keep = np.ones(vocab, dtype=bool)
        if c.get("min_p"):
            keep &= probs >= c["min_p"] * probs.max()
        order = np.argsort(-x)
        if 0 < c.get("top_k", 0) < vocab:
            keep &= x >= x[order[c["top_k"] - 1]]
        if c.get("top_p", 1.0) < 1.0:
            kept_probs = np.where(keep, probs, 0.0)
            kept_probs /= kept_probs.sum()
            mass_before = np.cumsum(kept_probs[order]) - kept_probs[order]
            nucleus = np.zeros(vocab, dtype=bool)
            nucleus[order] = mass_before < c["top_p"]
            keep &= nucleus
        expected = np.where(keep, x, NEG_INF)
        np.testing.assert_allclose(got[row], expected, rtol=1e-5, err_msg=str(c))


def test_candidate_and_sorted_thresholds_agree():
    logits = torch.cat([torch.randn(8, 5000) * 0.2, torch.randn(8, 5000) * 8])  # flat and peaked rows
    top_p = torch.linspace(0.05, 1.0, 16)
    min_p = torch.tensor([0.0, 0.1] * 8)
    top_k = torch.tensor([0, 7, 0, 100] * 4)
    args = dict(min_p=min_p, top_k=top_k, max_top_k=100, top_p=top_p)
    weights = lp.exp_weights(logits)
    fast = lp.filter_thresholds(logits, weights, use_candidates=True, **args)
    exact = lp.filter_thresholds(logits, weights, use_candidates=False, **args)
    assert torch.equal(fast, exact)


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_fast_argmax_equals_argmax(vocab):
    rng = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (16, vocab), generator=rng).float()  # many ties: the first maximum wins
    assert torch.equal(lp.fast_argmax(logits), logits.argmax(dim=-1))
    logits = torch.randn(16, vocab, generator=rng)
    assert torch.equal(lp.fast_argmax(logits), logits.argmax(dim=-1))
    logits[3, vocab // 2] = logits[3, vocab // 3] = float("nan")  # NaN counts as the maximum, the first one wins
    logits[5] = float("-inf")
    assert torch.equal(lp.fast_argmax(logits), logits.argmax(dim=-1))
    padded = torch.zeros(16, vocab + 16)  # rows padded as some LM-head kernels return them
    padded[:, :vocab] = logits
    assert torch.equal(lp.fast_argmax(padded[:, :vocab]), logits.argmax(dim=-1))
    for dtype in (torch.float16, torch.bfloat16):  # numpy's argmax, and torch's where numpy has no such dtype
        assert torch.equal(lp.fast_argmax(logits.to(dtype)), logits.to(dtype).argmax(dim=-1))


def test_two_level_sampling_distribution():
    """Few allowed tokens spread over different blocks of a 1024 vocabulary, seeded and unseeded rows."""
    logits = torch.full((1, 1024), NEG_INF)
    tokens = torch.tensor([3, 255, 256, 700, 1023])
    logits[0, tokens] = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.5])
    expected = torch.softmax(logits[0, tokens], dim=0).numpy()
    rows = 20000
    batch = logits.repeat(rows, 1)
    generators = {i: torch.Generator().manual_seed(i) for i in range(0, rows, 2)}
    torch.manual_seed(1)
    sampled = lp.random_sample(batch, None, generators)
    assert set(sampled.tolist()) <= set(tokens.tolist())
    freq = np.array([(sampled == t).float().mean().item() for t in tokens])
    assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / rows)), (freq, expected)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits(32, vocab=1000, seed=5)
    greedy = logits.argmax(dim=-1)
    sampler = Sampler()
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5), dict(temperature=0.0)):
        states = [state(**kwargs) for _ in range(32)]
        assert torch.equal(sampler(logits.clone(), states).sampled_token_ids, greedy), kwargs


def test_sampled_distribution_follows_temperature_top_k_and_top_p():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5])
    rows = 20000
    cases = [
        (dict(temperature=0.5), np.exp(base.numpy() / 0.5)),
        (dict(temperature=2.0, top_k=3), np.where(base.numpy() >= 1.0, np.exp(base.numpy() / 2.0), 0.0)),
        # probs at T=1: 3 → 0.61, 2 → 0.22, 1 → 0.08: top_p 0.7 keeps the two most likely.
        (dict(temperature=1.0, top_p=0.7), np.where(base.numpy() >= 2.0, np.exp(base.numpy()), 0.0)),
    ]
    torch.manual_seed(0)
    for kwargs, weights in cases:
        expected = weights / weights.sum()
        tokens = Sampler()(base.repeat(rows, 1), [state(**kwargs) for _ in range(rows)]).sampled_token_ids
        freq = np.bincount(tokens.numpy(), minlength=len(base)) / rows
        # 5 standard errors of a binomial proportion.
        tolerance = 5 * np.sqrt(expected * (1 - expected) / rows) + 1e-9
        assert np.all(np.abs(freq - expected) <= tolerance), (kwargs, freq, expected)


def test_seed_reproducible_and_independent_of_batch_neighbours():
    def run(position: int, neighbours: list[dict], seed: int = 1234, steps: int = 12) -> list[int]:
        seeded = state(seed=seed, temperature=0.9, top_p=0.95)
        others = [state(**n) for n in neighbours]
        batch = others[:position] + [seeded] + others[position:]
        tokens = []
        for step in range(steps):
            logits = random_logits(len(batch), vocab=500, seed=100 + step)
            # The seeded row sees the same logits whatever its position.
            logits[position] = random_logits(1, vocab=500, seed=100 + step)[0]
            tokens.append(int(Sampler()(logits, batch).sampled_token_ids[position]))
            seeded.output_token_ids.append(tokens[-1])
        return tokens

    alone = run(0, [])
    assert run(2, [dict(), dict(temperature=0.0), dict(seed=7, top_k=5)]) == alone
    assert run(1, [dict(temperature=0.0), dict(repetition_penalty=1.2), dict(seed=99), dict()]) == alone
    assert run(0, [], seed=4321) != alone


def test_mixed_greedy_and_random_rows_keep_greedy_argmax():
    logits = random_logits(6, vocab=300, seed=9)
    states = [state(temperature=0.0) if i % 2 else state(temperature=1.0, seed=i) for i in range(6)]
    out = Sampler()(logits.clone(), states).sampled_token_ids
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out[1::2], logits[1::2].argmax(dim=-1))


# ---------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_with_top_k_and_rank():
    states = [
        state(logprobs=3, temperature=1.0, repetition_penalty=1.5, output=[1, 2], seed=0),
        state(logprobs=0, temperature=0.0, logit_bias={7: 50.0}),
        state(),  # asked nothing; its row is computed but unused
    ]
    logits = random_logits(len(states), vocab=200, seed=11)
    out = Sampler()(logits.clone(), states)
    expected = torch.log_softmax(logits.double(), dim=-1)
    sampled = out.sampled_token_ids
    assert sampled[1] == 7  # the biased token is sampled, but its logprob is from the raw distribution
    lp = out.logprobs
    assert lp.token_ids.shape == (3, 4) and torch.equal(lp.token_ids[:, 0], sampled)
    for row in range(3):
        row_lp = expected[row]
        torch.testing.assert_close(lp.logprobs[row].double(), row_lp[lp.token_ids[row]], rtol=1e-5, atol=1e-5)
        assert lp.token_ids[row, 1:].tolist() == row_lp.topk(3).indices.tolist()
        assert lp.ranks[row] == int((row_lp > row_lp[sampled[row]]).sum()) + 1


def test_whole_vocabulary_logprobs_and_prompt_logprobs():
    logits = random_logits(2, vocab=50, seed=2)
    out = Sampler()(logits.clone(), [state(logprobs=-1, temperature=0.0), state(temperature=0.0)])
    assert out.logprobs.token_ids.shape == (2, 51)
    assert out.logprobs.ranks.tolist() == [1, 1]

    prompt_logits = random_logits(5, vocab=50, seed=4)
    targets = [3, 9, 9, 0, 49]
    result = compute_prompt_logprobs(prompt_logits, targets, 2)
    expected = torch.log_softmax(prompt_logits.double(), dim=-1)
    ids, values, ranks = result.tolists()
    for i, target in enumerate(targets):
        assert ids[i][0] == target and ids[i][1:] == expected[i].topk(2).indices.tolist()
        assert math.isclose(values[i][0], float(expected[i, target]), rel_tol=1e-5, abs_tol=1e-6)
        assert ranks[i] == int((expected[i] > expected[i, target]).sum()) + 1


def test_rejects_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"logits must be \[num_rows=2, vocab\], got shape \(3, 10\)"):
        Sampler()(torch.zeros(3, 10), [state(), state()])
