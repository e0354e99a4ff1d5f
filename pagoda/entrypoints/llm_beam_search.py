"""``LLM.beam_search``'s results in vLLM's shape: the engine's final ``RequestOutput`` of each beam-search
request, one ``CompletionOutput`` per beam, turned into a ``BeamSearchOutput``.

As vLLM's ``LLM.beam_search`` does, a sequence's ``tokens`` are the prompt followed by the generated tokens and
its ``text`` is those tokens decoded (with the tokenizer's defaults), so code written for vLLM reads the same
strings; the server's choices carry only the generated text.
"""

from __future__ import annotations

from typing import Any

from pagoda.beam_search import BeamSearchOutput, BeamSearchSequence
from pagoda.outputs import CompletionOutput, RequestOutput


def beam_search_outputs(outputs: list[RequestOutput], tokenizer: Any) -> list[BeamSearchOutput]:
    return [BeamSearchOutput(sequences=[_sequence(output, beam, tokenizer) for beam in output.outputs])
            for output in outputs]


def _sequence(output: RequestOutput, beam: CompletionOutput, tokenizer: Any) -> BeamSearchSequence:
    tokens = list(output.prompt_token_ids or []) + list(beam.token_ids)
    return BeamSearchSequence(tokens=tokens, logprobs=list(beam.logprobs or []),
                              cum_logprob=beam.cumulative_logprob or 0.0,
                              text=tokenizer.decode(tokens) if tokenizer is not None else None,
                              finish_reason=beam.finish_reason, stop_reason=beam.stop_reason)
