"""What ``LLM.beam_search`` returns, shaped like vLLM's ``vllm.beam_search`` classes.

The search itself runs inside the engine (``pagoda/core/beam_search/``); these are only its results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.outputs import Logprob


@dataclass
class BeamSearchSequence:
    """One returned beam. As in vLLM, ``tokens`` holds the prompt followed by the generated tokens, ``text`` is
    all of them decoded (prompt included, with the tokenizer's defaults), and ``logprobs`` has one dict per
    generated token: the candidates the search ranked at that step (the chosen token among them).
    ``finish_reason`` is "stop" for a sequence that ended with EOS, else "length"."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The ``beam_width`` best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]
