"""A request's output constraint, from the fields vLLM and OpenAI define for it, as one ``StructuredOutputsParams``.

Accepted on ``/v1/completions`` and ``/v1/chat/completions``: vLLM's ``structured_outputs`` object (extra body),
its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields with
``guided_whitespace_pattern`` and ``guided_decoding_backend`` (``xgrammar`` or ``auto`` only), and OpenAI's
``response_format`` (``json_object``, ``json_schema``; ``text`` is no constraint). At most one constraint per
request. The constraint is parsed here, so a bad schema, regex or grammar is a 400 naming the field the client
used, before the request reaches the engine.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pagoda.core.structured_output import StructuredOutputsConfig, check_backend, grammar_spec, parse_grammar
from pagoda.entrypoints.openai.serving_engine import APIError
from pagoda.sampling_params import StructuredOutputsParams

_PARAMS_FIELDS = tuple(f.name for f in fields(StructuredOutputsParams))
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def structured_outputs_from_request(request: Any, config: StructuredOutputsConfig | None = None
                                    ) -> StructuredOutputsParams | None:
    """The request's constraint, validated; None when it has none. Errors are 400s naming the field."""
    sources: list[tuple[str, dict[str, Any]]] = []
    if request.structured_outputs is not None:
        unknown = sorted(set(request.structured_outputs) - set(_PARAMS_FIELDS))
        if unknown:
            raise APIError(f"structured_outputs: unknown field(s) {', '.join(unknown)}; allowed: "
                           f"{', '.join(_PARAMS_FIELDS)}", 400, "structured_outputs")
        sources.append(("structured_outputs", dict(request.structured_outputs)))
    for name, key in _GUIDED_FIELDS.items():
        value = getattr(request, name)
        if value is not None:
            sources.append((name, {key: value}))
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        sources.append(("response_format", _response_format_constraint(response_format)))
    if request.guided_decoding_backend is not None:
        try:
            check_backend(request.guided_decoding_backend, "guided_decoding_backend")
        except ValueError as exc:
            raise APIError(str(exc), 400, "guided_decoding_backend") from None
    if not sources:
        if request.guided_whitespace_pattern is not None:
            raise APIError("guided_whitespace_pattern: applies to a JSON constraint (guided_json, response_format "
                           "or structured_outputs), and the request has none", 400, "guided_whitespace_pattern")
        return None
    if len(sources) > 1:
        raise APIError(f"{sources[1][0]}: a request takes one output constraint; got "
                       f"{', '.join(name for name, _ in sources)}", 400, sources[1][0])
    param, kwargs = sources[0]
    if request.guided_whitespace_pattern is not None:
        kwargs["whitespace_pattern"] = request.guided_whitespace_pattern
    try:
        params = StructuredOutputsParams(**kwargs)
        parse_grammar(grammar_spec(params, config))
    except (ValueError, TypeError) as exc:
        message = str(exc).removeprefix("structured outputs: ").removeprefix("structured_outputs: ")
        raise APIError(f"{param}: {message}", 400, param) from None
    return params


def _response_format_constraint(response_format: Any) -> dict[str, Any]:
    if response_format.type == "json_object":
        return {"json_object": True}
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise APIError("response_format: type json_schema needs json_schema.schema", 400, "response_format")
    return {"json": spec.json_schema}
