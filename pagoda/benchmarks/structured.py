"""The structured-output option of ``pagoda bench throughput``: a share of the requests constrained by one JSON
schema (vLLM's ``--structured-output-ratio`` and ``--json-schema-path``).

W1 with ``--structured-output-ratio 1`` is the issue's structured-output workload: every request constrained by
the same schema, compared with the same run at ratio 0. The default schema lets a record run long (free-text
strings, an array of up to 16 entries), so most requests use their whole output length as unconstrained ones do;
a request whose JSON ends earlier stops there, so compare output tokens per second, and see
``num_constrained_stopped`` for how many ended with their JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "documentary", "science fiction", "thriller"]},
        "summary": {"type": "string"},
        "cast": {"type": "array", "maxItems": 16,
                 "items": {"type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
                           "required": ["name", "role"]}},
    },
    "required": ["title", "year", "genre", "summary", "cast"],
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structured outputs")
    group.add_argument("--structured-output-ratio", type=float, default=0.0,
                       help="share of the requests constrained by the JSON schema (0: none, 1: every one)")
    group.add_argument("--json-schema-path", default=None,
                       help="the JSON schema file of the constrained requests (default: a movie record)")


def schema_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The schema of the constrained requests, or None when the run has none."""
    ratio = args.structured_output_ratio
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"structured_output_ratio: must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return None
    if args.json_schema_path is None:
        return DEFAULT_SCHEMA
    with open(args.json_schema_path) as f:
        return json.load(f)


def _is_constrained(index: int, ratio: float) -> bool:
    return int((index + 1) * ratio) > int(index * ratio)


def num_constrained(num_requests: int, ratio: float) -> int:
    return sum(_is_constrained(i, ratio) for i in range(num_requests))


def constrain(params: list[Any], schema: dict[str, Any] | None, ratio: float) -> list[Any]:
    """``params`` with ``ratio`` of them (spread evenly over the list) constrained by ``schema``."""
    if schema is None:
        return params
    from pagoda.sampling_params import StructuredOutputsParams

    result = []
    for i, p in enumerate(params):
        if _is_constrained(i, ratio):
            p = p.clone()
            p.structured_outputs = StructuredOutputsParams(json=schema)
        result.append(p)
    return result
