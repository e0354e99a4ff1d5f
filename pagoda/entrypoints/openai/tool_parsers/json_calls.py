"""Tool calls written as JSON objects (``{"name": ..., "arguments": {...}}``), read whole or while they stream in.

Both readings give a call's ``arguments`` as the raw JSON text the model wrote for them (a JSON string value is
decoded first), so the pieces a stream sends add up to exactly what the whole-output extraction returns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pagoda.entrypoints.openai.protocol import (DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall,
                                                random_tool_call_id)

ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3 writes "parameters", most others "arguments"
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null|-")
_WHITESPACE = " \t\r\n"


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def value_end(text: str, i: int, resume: dict[int, tuple[int, int, bool]] | None = None) -> int | None:
    """Where the JSON value starting at ``text[i]`` ends (exclusive); ``None`` if the text ends before it does.
    Raises ``ValueError`` where the text can't be JSON. ``resume`` keeps where the scan of an unfinished object or
    array stopped, so a stream that calls again with a longer text scans only the new characters."""
    if i >= len(text):
        return None
    first = text[i]
    if first == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
            elif text[j] == '"':
                return j + 1
            else:
                j += 1
        return None
    if first in "{[":
        j, depth, in_string = resume.get(i, (i, 0, False)) if resume is not None else (i, 0, False)
        while j < len(text):
            c = text[j]
            if in_string:
                if c == "\\":
                    j += 1
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        if resume is not None:
            resume[i] = (j, depth, in_string)  # past the end after a backslash: the next character is escaped
        return None
    match = _SCALAR.match(text, i)
    if match is None:
        if any(literal.startswith(text[i:]) for literal in ("true", "false", "null")):
            return None  # "tr" of a true still streaming in
        raise ValueError(f"not JSON at {text[i:i + 20]!r}")
    # a number (or true/false/null) reaching the end of the text may still grow
    return None if match.end() == len(text) else match.end()


@dataclass
class Member:
    key: str
    start: int  # where the value starts
    end: int | None  # where it ends; None while it is still streaming in


def scan_object(text: str, start: int,
                resume: dict[int, tuple[int, int, bool]] | None = None) -> tuple[list[Member], int | None]:
    """The members of the JSON object at ``text[start]`` (``{``) as far as they have arrived, and where the object
    ends (``None`` while it is incomplete); ``resume`` as for :func:`value_end`. Raises ``ValueError`` where the
    text can't be a JSON object."""
    if start >= len(text) or text[start] != "{":
        raise ValueError("a tool call must be a JSON object")
    members: list[Member] = []
    i = skip_whitespace(text, start + 1)
    if i < len(text) and text[i] == "}":
        return members, i + 1
    while i < len(text):
        if text[i] != '"':
            raise ValueError("object keys must be strings")
        key_end = value_end(text, i)
        if key_end is None:
            return members, None
        key = json.loads(text[i:key_end])
        i = skip_whitespace(text, key_end)
        if i >= len(text):
            return members, None
        if text[i] != ":":
            raise ValueError("expected ':' after an object key")
        i = skip_whitespace(text, i + 1)
        if i >= len(text):
            return members, None
        end = value_end(text, i, resume)
        members.append(Member(key, i, end))
        if end is None:
            return members, None
        i = skip_whitespace(text, end)
        if i >= len(text):
            return members, None
        if text[i] == "}":
            return members, i + 1
        if text[i] != ",":
            raise ValueError("expected ',' or '}' in an object")
        i = skip_whitespace(text, i + 1)
    return members, None


def _arguments_member(members: list[Member], keys: tuple[str, ...]) -> Member | None:
    return next((m for m in members if m.key in keys), None)


def _arguments_text(text: str, member: Member | None) -> str:
    if member is None:
        return "{}"
    raw = text[member.start:member.end]
    if raw.startswith('"'):  # arguments sent as a JSON string holding the JSON
        return json.loads(raw)
    return raw


def parse_call(text: str, start: int, argument_keys: tuple[str, ...] = ARGUMENT_KEYS) -> tuple[ToolCall, int]:
    """The complete call object at ``text[start]`` and where it ends; ``ValueError`` if it isn't one."""
    members, end = scan_object(text, start)
    if end is None:
        raise ValueError("the tool call's JSON object is incomplete")
    parsed = json.loads(text[start:end])
    name = parsed.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a 'name' string")
    arguments = _arguments_text(text, _arguments_member(members, argument_keys))
    json.loads(arguments)  # the arguments must be JSON themselves
    return ToolCall(id=random_tool_call_id(), function=FunctionCall(name=name, arguments=arguments)), end


class CallStream:
    """One call object streaming in: ``update`` returns the delta pieces that have become certain since the last
    update — the id and name first (once the name is complete), then the arguments' text as it arrives."""

    def __init__(self, index: int, argument_keys: tuple[str, ...] = ARGUMENT_KEYS):
        self.index = index
        self.argument_keys = argument_keys
        self.name: str | None = None
        self.sent_arguments = 0
        self.end: int | None = None
        self._resume: dict[int, tuple[int, int, bool]] = {}  # long arguments are scanned once, not every delta

    def update(self, text: str, start: int) -> list[DeltaToolCall]:
        """Read the object at ``text[start]`` as far as it has arrived; ``ValueError`` if it can't be a call."""
        members, self.end = scan_object(text, start, self._resume)
        deltas: list[DeltaToolCall] = []
        if self.name is None:
            name = next((m for m in members if m.key == "name" and m.end is not None), None)
            if name is None:
                if self.end is not None:
                    raise ValueError("a tool call needs a 'name'")
                return deltas
            self.name = json.loads(text[name.start:name.end])
            if not isinstance(self.name, str):
                raise ValueError("a tool call's 'name' must be a string")
            deltas.append(DeltaToolCall(index=self.index, id=random_tool_call_id(), type="function",
                                        function=DeltaFunctionCall(name=self.name)))
        arguments = _arguments_member(members, self.argument_keys)
        if arguments is not None and text[arguments.start] == "{":
            # every character of an unfinished object belongs to it, so it can go out as it arrives
            available = text[arguments.start:arguments.end if arguments.end is not None else len(text)]
        elif self.end is not None:
            available = _arguments_text(text, arguments)  # a string value or no arguments: sent once complete
        else:
            available = ""
        if len(available) > self.sent_arguments:
            deltas.append(DeltaToolCall(index=self.index,
                                        function=DeltaFunctionCall(arguments=available[self.sent_arguments:])))
            self.sent_arguments = len(available)
        return deltas
