"""One prompt's beam search: which continuations survive each step, which sequences are finished, when to stop.

The arithmetic is transformers' ``generate(num_beams=w, do_sample=False)`` (``GenerationMixin._beam_search``),
step for step, so the two return the same sequences for the same scores:

* every live beam offers its top ``K = max(2, 1 + #EOS ids) · w`` tokens, scored by the beam's cumulative
  log-probability plus the token's; the best ``K`` of all of them are the step's candidates, best first;
* a candidate that ends (an EOS token, or the ``max_tokens``-th token) may enter the finished list only if it
  is among the first ``w`` candidates, with the score ``cumulative / generated_length ** length_penalty``
  (the length counts the EOS); the finished list keeps the best ``w``;
* the ``w`` best candidates that don't end are the next step's beams;
* the search stops when every candidate ends, when ``early_stopping=True`` and ``w`` sequences are finished,
  or when the best live beam can no longer beat the worst of ``w`` finished ones (transformers' heuristic:
  its score divided by the current length — by ``max_tokens`` with ``early_stopping="never"`` and a positive
  length penalty).

Scores are kept in float32 as transformers keeps them, so near-ties break the same way. Each sequence's tokens
and per-step candidate logprobs are a linked list of :class:`BeamNode` (shared by the beams forked from one
another), read out only for the sequences returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagoda.sampling_params import BeamSearchParams

#: The score transformers gives slots it rules out; kept for the same comparisons.
_RULED_OUT = np.float32(-1.0e9)


@dataclass(eq=False)
class BeamNode:
    """The last token of a beam, with its step's candidate row and the node before it (None: the prompt)."""

    token: int
    candidates: tuple[list[int], list[float]]  # the ranked row this token was chosen from (ids, logprobs)
    parent: BeamNode | None
    length: int  # generated tokens up to and including this one

    def path(self) -> list[BeamNode]:
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class Continuation:
    """A surviving candidate: the index (in the group's current beams) of the beam it extends, and its token."""

    beam: int
    token: int
    score: np.float32  # cumulative log-probability
    node: BeamNode


@dataclass
class Hypothesis:
    """A finished sequence."""

    score: np.float32  # length-normalised
    cum_logprob: float
    node: BeamNode
    finish_reason: str  # "stop" (ended with EOS) or "length"


@dataclass
class BeamGroup:
    """The search state of one prompt. ``beams`` are the live beams' engine requests (the scheduler runs them
    as a unit), ``scores`` their cumulative log-probabilities and ``nodes`` their last tokens, in the same order
    (best first)."""

    request_id: str
    params: BeamSearchParams
    prompt: str | None
    prompt_token_ids: list[int]
    eos_token_ids: frozenset[int]
    max_tokens: int  # params.max_tokens, capped by the room the context leaves
    arrival_time: float
    beams: list[Any] = field(default_factory=list)
    scores: list[np.float32] = field(default_factory=list)
    nodes: list[BeamNode | None] = field(default_factory=list)
    finished: list[Hypothesis] = field(default_factory=list)
    num_generated: int = 0
    improvement_possible: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    done: bool = False

    @property
    def width(self) -> int:
        return self.params.beam_width

    @property
    def num_candidates(self) -> int:
        """K: candidates kept per step (and logprobs asked of each beam), as transformers' beams_to_keep."""
        return max(2, 1 + len(self.eos_token_ids)) * self.width

    def advance(self, rows: list[tuple[list[int], list[float]]]) -> list[Continuation]:
        """Take one step: ``rows[i]`` is beam ``i``'s top-K tokens and their log-probabilities, best first.
        Returns the next beams (empty once :attr:`done`)."""
        width, num_candidates = self.width, self.num_candidates
        length = self.num_generated + 1
        candidates = []  # (score, beam, rank)
        for beam, ((_, logprobs), score) in enumerate(zip(rows, self.scores)):
            for rank, logprob in enumerate(logprobs[:num_candidates]):
                candidates.append((np.float32(score + np.float32(logprob)), beam, rank))
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam, then rank order, like a flat top-k
        candidates = candidates[:num_candidates]
        at_max_length = length >= self.max_tokens
        eos = self.eos_token_ids
        parents = self.nodes

        def node(beam: int, rank: int) -> BeamNode:
            row = rows[beam]
            return BeamNode(row[0][rank], row, parents[beam], length)

        ends = [at_max_length or rows[beam][0][rank] in eos for _, beam, rank in candidates]
        early_stopping = self.params.early_stopping
        full = len(self.finished) == width and early_stopping is True
        if self.improvement_possible and not full:
            penalty = np.float32(length ** self.params.length_penalty)
            new = [Hypothesis(np.float32(score / penalty), float(score), node(beam, rank),
                              "stop" if rows[beam][0][rank] in eos else "length")
                   for (score, beam, rank), end in zip(candidates[:width], ends[:width]) if end]
            if new:
                merged = self.finished + new
                merged.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties, as in the merged top-k
                self.finished = merged[:width]
        continuing = [Continuation(beam, rows[beam][0][rank], score, node(beam, rank))
                      for (score, beam, rank), end in zip(candidates, ends) if not end][:width]
        self.num_generated = length
        if all(ends) or not continuing:
            self.done = True
            return []
        if len(self.finished) == width:
            if early_stopping == "never" and self.params.length_penalty > 0.0:
                best_length = self.max_tokens
            else:
                best_length = length
            best_running = np.float32(continuing[0].score / np.float32(best_length ** self.params.length_penalty))
            self.improvement_possible = self.improvement_possible and bool(
                best_running > min(h.score for h in self.finished))
            if not self.improvement_possible or early_stopping is True:
                self.done = True
                return []
        return continuing

    def results(self) -> list[Hypothesis]:
        """The sequences to return, best first: the finished ones, then (if the search was cut short) the live
        beams, scored the same way."""
        results = list(self.finished)
        if len(results) < self.width:
            penalty = np.float32(max(self.num_generated, 1) ** self.params.length_penalty)
            results += [Hypothesis(np.float32(score / penalty), float(score), node, "length")
                        for score, node in zip(self.scores, self.nodes) if node is not None]
            results.sort(key=lambda h: -h.score)
        return results[:self.width]
