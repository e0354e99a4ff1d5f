"""From a request's ``StructuredOutputsParams`` to an xgrammar ``Grammar``, with every error the request can make
reported as a ``ValueError`` naming the problem.

A :class:`GrammarSpec` is the hashable description of one constraint (its kind, its text and the formatting
options that change the grammar); it is the key of both caches: the parsed grammars here (so validating the same
schema again costs a dictionary lookup) and the compiled ones in the backend. Parsing — the JSON-schema, regex or
EBNF conversion — finds every mistake a request can make and takes well under a millisecond for ordinary
constraints, so it runs when the request is added; compiling against the vocabulary, the slow part, runs off the
engine thread (:mod:`~pagoda.core.structured_output.backend`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from pagoda.core.structured_output.config import StructuredOutputsConfig
from pagoda.sampling_params import StructuredOutputsParams

#: The string formats xgrammar turns into a grammar; others it would silently treat as any string.
SUPPORTED_STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname",
                                      "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
                                      "relative-json-pointer"})
#: JSON-schema keywords xgrammar ignores: a schema using them is refused rather than half enforced.
UNSUPPORTED_KEYWORDS = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
                        "dependentRequired", "dependentSchemas", "dependencies")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                  "additionalItems")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
#: The whitespace xgrammar's JSON grammars allow between tokens, as their EBNF writes it.
_JSON_WHITESPACE = "[ \\n\\r\\t]"
_WHITESPACE_RULE = "pagoda_whitespace"


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint, hashable: ``kind`` is ``json``, ``json_object``, ``regex``, ``choice``, ``grammar`` or
    ``structural_tag``; ``text`` is the schema (JSON text), regex, choices (a JSON list), grammar or tag."""

    kind: str
    text: str
    any_whitespace: bool = True
    whitespace_pattern: str | None = None
    disable_additional_properties: bool = False


def grammar_spec(params: StructuredOutputsParams, config: StructuredOutputsConfig | None = None) -> GrammarSpec:
    """The spec of a request's constraint; the engine's config sets the defaults of the formatting flags."""
    config = config or StructuredOutputsConfig()
    if not isinstance(params, StructuredOutputsParams):
        raise ValueError(f"structured_outputs: must be a StructuredOutputsParams, got {type(params).__name__}")
    kind = params.kind
    whitespace_pattern = params.whitespace_pattern
    if whitespace_pattern is not None and kind not in ("json", "json_object"):
        raise ValueError(f"structured_outputs: whitespace_pattern applies to json and json_object constraints, not "
                         f"to {kind}")
    if kind == "json":
        text = _schema_text(params.json)
    elif kind == "json_object":
        text = '{"type": "object"}'
    elif kind == "choice":
        text = json.dumps(params.choice, ensure_ascii=False)
    else:
        text = getattr(params, kind)
        if not isinstance(text, str) or not text:
            raise ValueError(f"structured_outputs: {kind} must be a non-empty string, got {text!r}")
    return GrammarSpec(kind, text,
                       any_whitespace=not (params.disable_any_whitespace or config.disable_any_whitespace),
                       whitespace_pattern=whitespace_pattern,
                       disable_additional_properties=(params.disable_additional_properties
                                                      or config.disable_additional_properties))


@functools.lru_cache(maxsize=512)
def parse_grammar(spec: GrammarSpec) -> Any:
    """The xgrammar ``Grammar`` of ``spec``; a ``ValueError`` naming the problem when it has none."""
    import xgrammar as xgr

    try:
        if spec.kind in ("json", "json_object"):
            return _json_grammar(xgr, spec)
        if spec.kind == "regex":
            if "\x00" in spec.text:
                raise ValueError("the regex contains a NUL character")
            return xgr.Grammar.from_regex(spec.text)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_grammar(json.loads(spec.text)))
        if spec.kind == "grammar":
            # vLLM takes Lark grammars too; EBNF (GBNF) rules are written with ::=, Lark's with a colon.
            if "::=" not in spec.text:
                return xgr.Grammar.from_lark(spec.text)
            return xgr.Grammar.from_ebnf(spec.text)
        return _structural_tag_grammar(xgr, spec.text)
    except ValueError as exc:
        raise ValueError(f"structured_outputs: invalid {_NAMES[spec.kind]}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - xgrammar reports every parse error as a RuntimeError
        message = _XGRAMMAR_LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        raise ValueError(f"structured_outputs: invalid {_NAMES[spec.kind]}: {message}") from None


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex", "choice": "choice",
          "grammar": "grammar", "structural_tag": "structural_tag"}


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (each one an escaped string literal)."""
    return "root ::= " + " | ".join(_ebnf_literal(choice) for choice in choices)


def _ebnf_literal(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char.isprintable():
            escaped.append(char)
        else:
            escaped.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(escaped) + '"'


# ----------------------------------------------------------------------------------------------- JSON schema
def _schema_text(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs: json is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs: json must be a JSON schema object, got {type(schema).__name__}")
    _check_schema(schema, "#")
    return json.dumps(schema, ensure_ascii=False)


def _check_schema(schema: Any, path: str) -> None:
    """Refuse what xgrammar would silently not enforce, naming the keyword and where it is."""
    if not isinstance(schema, dict):
        return
    for keyword in UNSUPPORTED_KEYWORDS:
        if keyword in schema:
            raise ValueError(f"structured_outputs: the JSON schema keyword {keyword!r} (at {path}) is not supported "
                             "by xgrammar")
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_STRING_FORMATS:
        raise ValueError(f"structured_outputs: the JSON schema string format {fmt!r} (at {path}) is not supported; "
                         f"supported: {', '.join(sorted(SUPPORTED_STRING_FORMATS))}")
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        raise ValueError(f"structured_outputs: a string with both a pattern/format and minLength/maxLength (at "
                         f"{path}) is not supported by xgrammar; put the length into the pattern")
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            _check_schema(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_VALUES:
        _check_schema(schema.get(key), f"{path}/{key}")
    for key in _SCHEMA_LISTS + ("items",):
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _check_schema(sub, f"{path}/{key}/{i}")


def _forbid_additional_properties(schema: Any) -> Any:
    """vLLM's ``disable_additional_properties``: objects that list their properties and say nothing about others
    get ``additionalProperties: false`` (xgrammar's strict mode already generates no others; this makes it the
    schema's own rule too, so it also holds where the schema opts out of strictness)."""
    if isinstance(schema, list):
        return [_forbid_additional_properties(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _forbid_additional_properties(value) for key, value in schema.items()}
    if "additionalProperties" not in result and ("properties" in result or "patternProperties" in result):
        result["additionalProperties"] = False
    return result


def _json_grammar(xgr: Any, spec: GrammarSpec) -> Any:
    schema = json.loads(spec.text)
    if spec.disable_additional_properties:
        schema = _forbid_additional_properties(schema)
    if spec.whitespace_pattern is None:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=spec.any_whitespace)
    # xgrammar has no whitespace-pattern option: take its any-whitespace grammar and put the pattern's grammar
    # where it allows whitespace.
    ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True))
    try:
        whitespace = str(xgr.Grammar.from_regex(spec.whitespace_pattern)) if spec.whitespace_pattern else 'root ::= ""'
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"whitespace_pattern {spec.whitespace_pattern!r} is not a valid regex: "
                         f"{_XGRAMMAR_LOCATION.sub('', str(exc).strip())}") from None
    renamed = _rename_rules(whitespace, "root", _WHITESPACE_RULE)
    return xgr.Grammar.from_ebnf(_replace_json_whitespace(ebnf) + "\n" + renamed)


def _ebnf_segments(ebnf: str) -> list[tuple[str, str]]:
    """``ebnf`` cut into ``("literal", …)`` (quoted strings and character classes, escapes included) and
    ``("code", …)`` pieces, so rewrites never touch the text a grammar matches."""
    segments: list[tuple[str, str]] = []
    i, start = 0, 0
    while i < len(ebnf):
        char = ebnf[i]
        if char in '"[':
            closing = '"' if char == '"' else "]"
            if i > start:
                segments.append(("code", ebnf[start:i]))
            j = i + 1
            while j < len(ebnf) and ebnf[j] != closing:
                j += 2 if ebnf[j] == "\\" else 1
            segments.append(("literal", ebnf[i:j + 1]))
            i = start = j + 1
            continue
        i += 1
    if start < len(ebnf):
        segments.append(("code", ebnf[start:]))
    return segments


def _replace_json_whitespace(ebnf: str) -> str:
    out: list[str] = []
    skip_star = False
    for kind, text in _ebnf_segments(ebnf):
        if skip_star:
            text, skip_star = (text[1:] if text.startswith("*") else text), False
        if kind == "literal" and text == _JSON_WHITESPACE:
            out.append(_WHITESPACE_RULE)
            skip_star = True
        else:
            out.append(text)
    return "".join(out)


def _rename_rules(ebnf: str, old: str, new: str) -> str:
    pattern = re.compile(rf"\b{re.escape(old)}(?=\b|_)")
    return "".join(pattern.sub(new, text) if kind == "code" else text for kind, text in _ebnf_segments(ebnf))


# -------------------------------------------------------------------------------------------- structural tag
def _structural_tag_grammar(xgr: Any, text: str) -> Any:
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if isinstance(tag, dict) and "structures" in tag:
        # vLLM's first format: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
        try:
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                     for s in tag["structures"]]
            return xgr.Grammar.from_structural_tag(items, tag["triggers"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"each structure needs begin, schema and end, and the tag needs triggers "
                             f"({exc})") from None
    return xgr.Grammar.from_structural_tag(text)
