"""``LLM.beam_search``'s results in vLLM's shape: the engine's final ``RequestOutput`` of each beam-search
request, one ``CompletionOutput`` per beam, turned into a ``BeamSearchOutput``."""

from __future__ import annotations

from pagoda.beam_search import BeamSearchOutput, BeamSearchSequence
from pagoda.outputs import RequestOutput


def beam_search_outputs(outputs: list[RequestOutput]) -> list[BeamSearchOutput]:
    return [BeamSearchOutput(sequences=[
        BeamSearchSequence(tokens=list(output.prompt_token_ids or []) + list(beam.token_ids),
                           logprobs=list(beam.logprobs or []), cum_logprob=beam.cumulative_logprob or 0.0,
                           text=beam.text, finish_reason=beam.finish_reason, stop_reason=beam.stop_reason)
        for beam in output.outputs]) for output in outputs]
