"""Batched logits transformations used by the sampler, each a function of tensors only.

Every function works on a ``[rows, vocab]`` float32 tensor in place (or returns the new tensor where an
in-place form would cost an extra copy) and treats rows independently. They follow vLLM's definitions;
the sampler decides which rows each one sees.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def pad_token_ids(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged id rows into ``[rows, max_len]`` plus a ``valid`` mask.

    Padding repeats the row's first id (0 for an empty row) instead of a sentinel, so that gathering and
    scattering at padded positions touches only tokens the row really has (the penalties mask pads out).
    """
    lengths = torch.tensor([len(r) for r in rows], device=device)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0).to(device, non_blocking=True)
    if padded.shape[1] == 0:
        padded = torch.zeros(len(rows), 1, dtype=torch.int64, device=device)
    valid = torch.arange(padded.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(valid, padded, padded[:, :1]), valid


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[torch.Tensor] | None,
    output_ids: list[torch.Tensor],
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> None:
    """vLLM's penalties, in place, touching only the tokens each row has seen (not the whole vocabulary).

    * repetition (prompt and output tokens): positive logits are divided by the penalty, negative ones
      multiplied, so a penalty > 1 always makes a seen token less likely;
    * frequency (output tokens): subtract ``penalty * count``;
    * presence (output tokens): subtract ``penalty`` once if the token occurred.
    Each penalty tensor is ``[rows]`` or None when no row uses it; ``prompt_ids`` is needed for repetition.
    A gather/scatter over the seen ids is exact even with repeated ids: every copy of an id reads the same
    old value and writes the same new one.
    """
    device = logits.device
    if repetition is not None:
        seen, valid = pad_token_ids([torch.cat([p, o]) for p, o in zip(prompt_ids, output_ids)], device)
        factor = torch.where(valid[:, :1], repetition.unsqueeze(1), 1.0)  # an empty row keeps factor 1
        values = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(values > 0, values / factor, values * factor))
    if frequency is None and presence is None:
        return
    out, valid = pad_token_ids(output_ids, device)
    if frequency is not None:
        logits.scatter_add_(1, out, torch.where(valid, -frequency.unsqueeze(1), 0.0))
    if presence is not None:
        values = logits.gather(1, out)
        logits.scatter_(1, out, values - torch.where(valid[:, :1], presence.unsqueeze(1), 0.0))


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


def apply_top_p_candidates(logits: torch.Tensor, top_p: torch.Tensor, num_candidates: int = 256) -> None:
    """Top-p (nucleus) filtering in place without sorting the whole vocabulary.

    A full sort of ``rows x vocab`` floats is slow on CPUs (hundreds of ms for 64 x 49152), while a real
    model's nucleus usually holds a few dozen tokens. So the ``num_candidates`` most likely tokens are taken
    with ``topk``; rows whose nucleus they cover are filtered with the probability threshold found there, and
    only the other rows (flat distributions) fall back to the sort. Same result as :func:`apply_top_k_top_p`.
    """
    vocab_size = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    cand_probs = probs.topk(min(num_candidates, vocab_size), dim=-1).values  # descending
    cumulative = cand_probs.cumsum(dim=-1)
    # A token is kept while the mass of the tokens more likely than it is still below top_p.
    num_kept = ((cumulative - cand_probs) < top_p.unsqueeze(1)).sum(dim=-1)
    covered = cumulative[:, -1] >= top_p
    threshold = cand_probs.gather(1, (num_kept - 1).unsqueeze(1))
    if bool(covered.all()):
        logits.masked_fill_(probs < threshold, _NEG_INF)
        return
    # Uncovered rows: an unreachable threshold here, then the sort-based filter on just those rows.
    threshold.masked_fill_(~covered.unsqueeze(1), 0.0)
    logits.masked_fill_(probs < threshold, _NEG_INF)
    rows = (~covered).nonzero().squeeze(1)
    logits[rows] = apply_top_k_top_p(logits[rows], None, top_p[rows])


def random_sample(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row from ``softmax(logits)`` by inverting the cumulative distribution.

    One uniform number per row (vLLM's exponential race needs one per vocabulary entry, which costs more
    than everything else on a CPU). Rows in ``generators`` draw their number from their own generator, so a
    seeded request samples the same tokens whatever else is in the batch.
    """
    rows = logits.shape[0]
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # masked (-inf) tokens get weight 0
    cdf = weights.cumsum_(dim=-1)
    total = cdf[:, -1:]
    uniform = torch.empty(rows, 1, device=logits.device)
    if len(generators) != rows:
        uniform.uniform_()
    for row, generator in generators.items():
        uniform[row].uniform_(generator=generator)
    # Strictly below the total, so `right=True` lands on a token of non-zero weight.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


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
