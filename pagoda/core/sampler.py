"""Batched token sampling: one call per step turns the logits of every sampling row into token ids.

Stages, in vLLM's order (each skipped entirely when no row of the batch uses it)::

    raw logits ──► logprobs (log_softmax of the *unprocessed* logits, like vLLM v1's default)
        │
        ├─ allowed_token_ids mask ─ logit_bias ─ bad_words ─ min_tokens (ban EOS/stop ids)
        ├─ repetition / frequency / presence penalties
        ├─ greedy rows: argmax                      (temperature < 1e-5)
        └─ random rows: temperature ─ min_p ─ top-k ─ top-p ─ inverse-CDF draw (own generator when seeded)

min_p comes before top-k/top-p as in vLLM v1 (it commutes with top-k; with top-p it changes which tokens
the nucleus renormalises over). The three filters are applied as one logit threshold per row rather than by
writing -inf into the logits (see :func:`~pagoda.core.logits_processing.filter_thresholds`).

Differences from vLLM that do not change the distribution: one uniform number per row instead of an
exponential race over the vocabulary, and on CPU top-p is searched among the most likely tokens before
falling back to a full sort (a full sort of 64 x 49152 floats takes hundreds of ms on a CPU).

The logits tensor is modified in place: the runner hands over a fresh one each step, so no defensive copy of
``rows x vocab`` floats is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pagoda.core import logits_processing as lp
from pagoda.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRequestState:
    """What the sampler needs about one request; the runner keeps one per request and appends sampled
    tokens to ``output_token_ids``.

    Per-request flags and token tensors are computed once here, so a step only reads attributes.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        p = self.params
        self.is_greedy = p.all_greedy
        self.has_penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        # Ids min_tokens keeps from being sampled: EOS and every stop token (as vLLM, also with ignore_eos).
        self.min_tokens_banned = sorted(set(self.eos_token_ids) | p.all_stop_token_ids | set(p.stop_token_ids))
        self.needs_masking = bool(
            p.allowed_token_ids or p.logit_bias or self.bad_words_token_ids or (p.min_tokens and self.min_tokens_banned)
        )
        # Greedy with nothing that could change the choice and no logprobs: the sampler's argmax-only path.
        self.is_plain_greedy = (self.is_greedy and not self.needs_masking and not self.has_penalties
                                and p.logprobs is None)
        self._prompt_tensor: torch.Tensor | None = None
        self._output_buffer = torch.empty(0, dtype=torch.int64)
        self._num_buffered = 0

    def prompt_tensor(self) -> torch.Tensor:
        """The distinct prompt ids (all the repetition penalty needs), computed once."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.unique(torch.tensor(self.prompt_token_ids, dtype=torch.int64))
        return self._prompt_tensor

    def output_tensor(self) -> torch.Tensor:
        """The output ids as a CPU tensor, extended with only the tokens appended since the last call."""
        num = len(self.output_token_ids)
        if num > self._num_buffered:
            if num > self._output_buffer.numel():
                grown = torch.empty(max(2 * num, 64), dtype=torch.int64)
                grown[: self._num_buffered] = self._output_buffer[: self._num_buffered]
                self._output_buffer = grown
            self._output_buffer[self._num_buffered : num] = torch.tensor(
                self.output_token_ids[self._num_buffered :], dtype=torch.int64
            )
            self._num_buffered = num
        return self._output_buffer[:num]


@dataclass
class LogprobsTensors:
    """Logprobs of a batch of positions: column 0 is the chosen token (sampled, or the actual next prompt
    token), columns 1.. the top-k tokens by logprob. Each row may use fewer than ``k`` of the columns."""

    token_ids: torch.Tensor  # int64 [rows, 1 + k]
    logprobs: torch.Tensor  # float32 [rows, 1 + k]
    ranks: torch.Tensor  # int64 [rows]: 1-based rank of the chosen token

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        return self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [rows]
    logprobs: LogprobsTensors | None  # set when any row asked for logprobs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator of a seeded request (None when unseeded: it uses the global RNG)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64))  # any Python int is a valid seed; torch takes 64 bits
    return generator


def bad_words_to_token_ids(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Tokenize bad words the way vLLM does: each word as written (leading spaces stripped) and, when it
    tokenizes differently, preceded by a space, so it is banned both at the start of text and mid-sentence."""
    result: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        result.append(plain)
        # Same length but a different first token means the space merged into a new word token.
        if spaced and len(spaced) == len(plain) and spaced[0] != plain[0]:
            result.append(spaced)
    return result


def compute_logprobs_tensors(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Top-``num_top`` tokens, the chosen tokens' logprobs and their ranks from ``[rows, vocab]`` logprobs."""
    chosen = chosen.to(torch.int64).unsqueeze(1)
    chosen_logprobs = logprobs.gather(1, chosen)
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
        token_ids = torch.cat([chosen, top_ids], dim=1)
        values = torch.cat([chosen_logprobs, top_logprobs], dim=1)
    else:
        token_ids, values = chosen, chosen_logprobs
    return LogprobsTensors(token_ids, values, ranks)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor | list[int],
                            num_logprobs: int) -> LogprobsTensors:
    """Prompt logprobs: row ``i`` of ``logits`` predicts ``next_token_ids[i]`` (the prompt token after it).

    ``num_logprobs`` -1 means the whole vocabulary. Logprobs are of the raw model distribution.
    """
    vocab_size = logits.shape[-1]
    num_top = vocab_size if num_logprobs == -1 else min(num_logprobs, vocab_size)
    targets = torch.as_tensor(next_token_ids, dtype=torch.int64, device=logits.device)
    return compute_logprobs_tensors(torch.log_softmax(logits.float(), dim=-1), targets, num_top)


class Sampler:
    """Samples the next token of every row; see the module docstring for the stages."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingRequestState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [num_rows={len(states)}, vocab], got shape {tuple(logits.shape)}.")
        if all(s.is_plain_greedy for s in states):  # the common case: one argmax, nothing else
            # No contiguous copy: argmax reads the rows where they are.
            return SamplerOutput(sampled_token_ids=lp.fast_argmax(logits.float()), logprobs=None)
        logits = logits.float().contiguous()  # no-ops for the usual contiguous float32 logits
        vocab_size = logits.shape[1]

        raw_logprobs = None
        num_top = _max_logprobs(states, vocab_size)
        if num_top is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = self.process_logits(logits, states)
        random_rows = [i for i, s in enumerate(states) if not s.is_greedy]
        if len(random_rows) == len(states):
            sampled = self._sample_random(logits, states)
        else:
            sampled = lp.fast_argmax(logits)
            if random_rows:
                index = torch.tensor(random_rows, device=logits.device)
                sub = logits.index_select(0, index)
                sampled[index] = self._sample_random(sub, [states[i] for i in random_rows])

        logprobs = None
        if raw_logprobs is not None:
            logprobs = compute_logprobs_tensors(raw_logprobs, sampled, num_top)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def process_logits(self, logits: torch.Tensor, states: list[SamplingRequestState]) -> torch.Tensor:
        """The stages that can change even a greedy choice: allowed_token_ids, logit_bias, bad_words,
        min_tokens, then penalties. Works in place where it can; returns the processed logits."""
        if any(s.needs_masking for s in states):
            self._apply_masks(logits, states)
        penalty_rows = [i for i, s in enumerate(states) if s.has_penalties]
        if penalty_rows:
            logits = self._apply_penalties(logits, states, penalty_rows)
        return logits

    # ----------------------------------------------------------------------------------- masking stages
    @staticmethod
    def _apply_masks(logits: torch.Tensor, states: list[SamplingRequestState]) -> None:
        device = logits.device
        # allowed_token_ids: -inf everywhere except the allowed ids of the rows that restrict.
        allowed_rows = [i for i, s in enumerate(states) if s.params.allowed_token_ids]
        if allowed_rows:
            keep_rows = [i for i in allowed_rows for _ in states[i].params.allowed_token_ids]
            keep_ids = [t for i in allowed_rows for t in states[i].params.allowed_token_ids]
            disallowed = torch.zeros_like(logits, dtype=torch.bool)
            disallowed[torch.tensor(allowed_rows, device=device)] = True
            disallowed[torch.tensor(keep_rows, device=device), torch.tensor(keep_ids, device=device)] = False
            logits.masked_fill_(disallowed, _NEG_INF)

        bias_rows, bias_ids, bias_values = [], [], []
        for i, s in enumerate(states):
            if s.params.logit_bias:
                bias_rows.extend([i] * len(s.params.logit_bias))
                bias_ids.extend(s.params.logit_bias.keys())
                bias_values.extend(s.params.logit_bias.values())
        if bias_rows:
            index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
            logits.index_put_(index, torch.tensor(bias_values, dtype=logits.dtype, device=device), accumulate=True)

        word_rows = [i for i, s in enumerate(states) if s.bad_words_token_ids]
        ban_rows, ban_ids = lp.bad_words_positions(
            word_rows,
            [states[i].bad_words_token_ids for i in word_rows],
            [states[i].output_token_ids for i in word_rows],
        )
        for i, s in enumerate(states):
            if s.params.min_tokens and len(s.output_token_ids) < s.params.min_tokens:
                ban_rows.extend([i] * len(s.min_tokens_banned))
                ban_ids.extend(s.min_tokens_banned)
        if ban_rows:
            logits[torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device)] = _NEG_INF

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, states: list[SamplingRequestState], rows: list[int]) -> torch.Tensor:
        device = logits.device
        params = [states[i].params for i in rows]
        every_row = len(rows) == len(states)
        index = None if every_row else torch.tensor(rows, device=device)
        sub = logits if every_row else logits.index_select(0, index)

        def per_row(values: list[float], neutral: float) -> torch.Tensor | None:
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=torch.float32, device=device)

        repetition = per_row([p.repetition_penalty for p in params], 1.0)
        frequency = per_row([p.frequency_penalty for p in params], 0.0)
        presence = per_row([p.presence_penalty for p in params], 0.0)
        outputs = [states[i].output_tensor() for i in rows]
        prompts = [states[i].prompt_tensor() for i in rows] if repetition is not None else None
        lp.apply_penalties(sub, prompts, outputs, repetition, frequency, presence)
        # Extreme (valid) penalties can overflow a logit to inf; keep the row's order without inf - inf = NaN.
        finite = torch.finfo(sub.dtype).max
        sub.nan_to_num_(nan=float("-inf"), posinf=finite, neginf=-finite)
        if not every_row:
            logits.index_copy_(0, index, sub)
        return logits

    # --------------------------------------------------------------------------------- random sampling
    def _sample_random(self, logits: torch.Tensor, states: list[SamplingRequestState]) -> torch.Tensor:
        """Sample rows that all use temperature > 0; ``logits`` holds exactly those rows."""
        logits, threshold, weights = self._temperature_and_thresholds(logits, states)
        generators = {i: s.generator for i, s in enumerate(states) if s.generator is not None}
        return lp.random_sample(logits, threshold, generators, weights)

    @classmethod
    def shape_random_logits(cls, logits: torch.Tensor, states: list[SamplingRequestState]) -> torch.Tensor:
        """Temperature, min_p, then top-k/top-p on rows that all sample randomly: the logits random sampling
        draws from, with filtered tokens at -inf (the sampler itself only uses the thresholds)."""
        logits, threshold, _ = cls._temperature_and_thresholds(logits, states)
        if threshold is None:
            return logits
        return logits.masked_fill_(logits < threshold, _NEG_INF)

    @staticmethod
    def _temperature_and_thresholds(
        logits: torch.Tensor, states: list[SamplingRequestState]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Temperature-scaled logits, the filter threshold per row and the exp weights (None when no
        row filters)."""
        device = logits.device
        params = [s.params for s in states]
        temperatures = [p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            logits.div_(_tensor(temperatures, device).unsqueeze(1))
        vocab_size = logits.shape[1]
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else 0 for p in params]
        use_min_p = any(p.min_p > 0.0 for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        if not (use_min_p or use_top_p or any(top_k)):
            return logits, None, None
        weights = lp.exp_weights(logits)
        threshold = lp.filter_thresholds(
            logits,
            weights,
            min_p=_tensor([p.min_p for p in params], device) if use_min_p else None,
            top_k=_tensor(top_k, device, torch.int64) if any(top_k) else None,
            max_top_k=max(top_k),
            top_p=_tensor([p.top_p for p in params], device) if use_top_p else None,
            use_candidates=device.type == "cpu",
        )
        return logits, threshold, weights


def _tensor(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _max_logprobs(states: list[SamplingRequestState], vocab_size: int) -> int | None:
    """The number of top logprobs the batch needs (the largest request), or None when no row asked."""
    wanted = [s.params.logprobs for s in states if s.params.logprobs is not None]
    if not wanted:
        return None
    return vocab_size if -1 in wanted else min(max(wanted), vocab_size)
