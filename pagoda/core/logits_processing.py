"""Batched logits transformations used by the sampler, each a function of tensors only.

Every function works on a ``[rows, vocab]`` float32 tensor in place (or returns the new tensor where an
in-place form would cost an extra copy) and treats rows independently. They follow vLLM's definitions;
the sampler decides which rows each one sees.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def token_count_tensors(
    token_id_rows: list[torch.Tensor], vocab_size: int, device: torch.device, *, counts: bool
) -> torch.Tensor:
    """Per-row occurrence counts (``counts=True``, float32) or presence mask (bool), shape ``[rows, vocab]``.

    Rows are padded with ``vocab_size``, which lands in an extra column that is then dropped, so one
    ``scatter`` handles every row whatever its length.
    """
    rows = len(token_id_rows)
    padded = torch.nn.utils.rnn.pad_sequence(token_id_rows, batch_first=True, padding_value=vocab_size)
    padded = padded.to(device, non_blocking=True)
    if counts:
        out = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=device)
        out.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    else:
        out = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=device)
        out.scatter_(1, padded, True)
    return out[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """vLLM's penalties; returns the penalised logits.

    * repetition (prompt and output tokens): positive logits are divided by the penalty, negative ones
      multiplied, so a penalty > 1 always makes a seen token less likely;
    * frequency (output tokens): subtract ``penalty * count``;
    * presence (output tokens): subtract ``penalty`` once if the token occurred.
    Each penalty tensor is ``[rows]`` or None when no row uses it.
    """
    output_mask = output_counts > 0
    if repetition is not None:
        seen = output_mask if prompt_mask is None else (output_mask | prompt_mask)
        penalty = torch.where(seen, repetition.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if frequency is not None:
        logits -= frequency.unsqueeze(1) * output_counts
    if presence is not None:
        logits -= presence.unsqueeze(1) * output_mask
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's (in place)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept), in place, without a full sort."""
    kth_values = logits.topk(max_top_k, dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
    logits.masked_fill_(logits < kth_values, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering with one ascending sort; returns the filtered logits.

    ``top_k`` rows with value 0 are unfiltered; ``top_p`` rows with value 1 keep everything. Top-p keeps
    the smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely token
    always survives, so a tiny ``top_p`` is greedy).
    """
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        # The k-th largest sits at ascending index vocab - k; k == 0 means off and maps to index 0 (the minimum).
        kth_index = torch.where(top_k > 0, vocab_size - top_k, 0).clamp_(0, vocab_size - 1)
        kth_values = sorted_logits.gather(1, kth_index.unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_values, _NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cumulative <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row from ``probs`` (modified in place) by an exponential race.

    ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks token ``i`` with probability ``p_i`` and needs no
    cumulative sum. Rows in ``generators`` draw their noise from their own generator, so a seeded request
    samples the same tokens whatever else is in the batch.
    """
    noise = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return probs.div_(noise).argmax(dim=-1)


def bad_words_positions(
    rows: list[int], bad_words: list[list[list[int]]], outputs: list[list[int]]
) -> tuple[list[int], list[int]]:
    """(row, token) pairs that bad words forbid next: a word's last token is banned once its other tokens
    are the newest output tokens (a one-token word is always banned). Only output tokens count, as in vLLM."""
    ban_rows: list[int] = []
    ban_tokens: list[int] = []
    for row, words, output in zip(rows, bad_words, outputs):
        for word in words:
            prefix_len = len(word) - 1
            if prefix_len == 0 or (prefix_len <= len(output) and output[-prefix_len:] == word[:-1]):
                ban_rows.append(row)
                ban_tokens.append(word[-1])
    return ban_rows, ban_tokens
