"""``use_beam_search`` on ``/v1/completions`` and ``/v1/chat/completions``: the request's fields as
``BeamSearchParams`` (``n`` is the beam width), as vLLM maps them.

The engine answers a beam-search request once, with its ``n`` best beams, best first (choice ``i`` is the
``i``-th best); a streamed request gets them at the end, one chunk per beam. Fields that shape sampling
rather than the search are refused with a 400 naming them instead of being ignored.
"""

from __future__ import annotations

from typing import Any

from pagoda.entrypoints.openai.serving_engine import APIError

#: Request fields beam search has no use for, with the value that means "unset".
_NOT_WITH_BEAM_SEARCH = {
    "best_of": None, "top_p": None, "top_k": None, "min_p": None, "repetition_penalty": None,
    "presence_penalty": None, "frequency_penalty": None, "logit_bias": None, "min_tokens": 0, "stop": None,
    "stop_token_ids": None, "logprobs": None, "top_logprobs": None, "response_format": None, "tools": None,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "structured_outputs": None, "guided_whitespace_pattern": None,
}


def beam_search_params(request: Any, max_tokens: int, default_temperature: float | None) -> Any:
    """The ``BeamSearchParams`` of a request with ``use_beam_search``; an ``APIError`` (400) for a field beam
    search can't honour."""
    from pagoda.sampling_params import BeamSearchParams

    for name, unset in _NOT_WITH_BEAM_SEARCH.items():
        value = getattr(request, name, unset)
        if name == "logprobs" and value is False:  # chat's logprobs is a flag
            continue
        if name == "response_format" and value is not None and value.type == "text":
            continue
        if value not in (unset, [], {}):
            raise APIError(f"{name}: not supported with use_beam_search (beam search ranks beams by their "
                           "log-probabilities; remove the field or use_beam_search)", 400, name)
    temperature = request.temperature if request.temperature is not None else default_temperature
    try:
        return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos,
                                temperature=1.0 if temperature is None else temperature,
                                length_penalty=request.length_penalty,
                                include_stop_str_in_output=request.include_stop_str_in_output,
                                early_stopping=request.early_stopping)
    except ValueError as exc:
        raise APIError(str(exc), 400) from exc
