"""Verification of draft tokens against the target model's distributions.

A request with drafts ``x_1..x_d`` has ``d + 1`` target rows: row ``j`` is the target's next-token distribution
after the request's tokens and ``x_1..x_j``.

* Greedy: the drafts are accepted while each equals its row's argmax; the first row whose argmax differs gives
  the corrected token (or, when all match, row ``d`` gives the bonus token). The output is exactly what plain
  greedy decoding produces.
* Sampling (Leviathan et al., Chen et al.): draft ``x_j`` drawn from ``q_j`` is accepted with probability
  ``min(1, p_j(x_j) / q_j(x_j))``; at the first rejection the token is drawn from ``normalize(max(0, p_j - q_j))``
  and the rest discarded; if all are accepted the bonus token is drawn from ``p_d``. Every emitted token is then
  distributed exactly as ``p``. For n-gram drafts ``q_j`` is one-hot on ``x_j``: acceptance with probability
  ``p_j(x_j)``, and the residual is ``p_j`` without ``x_j``.

``p`` is the distribution plain sampling draws from — the same masks, penalties, temperature, min-p, top-k and
top-p — and the uniform numbers come from the request's own generator (the global one when unseeded).
"""

from __future__ import annotations

import torch


def greedy_accept(targets: list[int], drafts: list[int]) -> int:
    """Number of leading drafts equal to the target's argmax at their row."""
    accepted = 0
    for target, draft in zip(targets, drafts):  # at most k comparisons, stops at the first mismatch
        if target != draft:
            break
        accepted += 1
    return accepted


def rejection_sample(probs: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> tuple[int, int]:
    """One request: ``probs`` ``[d + 1, vocab]`` target probabilities, ``drafts`` ``[d]`` int64 draft ids,
    ``draft_probs`` ``[d, vocab]`` (None: one-hot). Returns ``(accepted drafts, the token after them)``."""
    num_drafts = drafts.shape[0]
    uniforms = torch.rand(num_drafts + 1, generator=generator, device=probs.device)
    rows = torch.arange(num_drafts, device=probs.device)
    target_p = probs[rows, drafts]
    if draft_probs is None:
        accept = uniforms[:num_drafts] < target_p
    else:
        draft_p = draft_probs[rows, drafts]
        # u < p/q, written without the division (q(x) > 0: x was drawn from q).
        accept = uniforms[:num_drafts] * draft_p < target_p
    accepted = int(accept.to(torch.int64).cumprod(0).sum())  # leading acceptances
    dist = probs[accepted]
    if accepted < num_drafts:
        if draft_probs is None:
            dist = dist.clone()
            dist[drafts[accepted]] = 0.0
        else:
            dist = (dist - draft_probs[accepted]).clamp_(min=0.0)
        if not float(dist.sum()) > 0.0:  # only by rounding (p == q): the rejection then had probability 0
            dist = probs[accepted]
    return accepted, sample_from(dist, uniforms[num_drafts])


def sample_from(dist: torch.Tensor, uniform: torch.Tensor) -> int:
    """Inverse-CDF draw from an unnormalised distribution: the first token whose cumulative mass exceeds
    ``uniform`` times the total (never a zero-probability token)."""
    cdf = dist.cumsum(0)
    return int(torch.searchsorted(cdf, (uniform * cdf[-1]).reshape(1), right=True).clamp_(max=dist.shape[0] - 1))
