"""``llama3_json``: Llama 3.1 / 3.2's JSON tool calls — the whole output is ``{"name": ..., "parameters": {...}}``
(or ``"arguments"``), optionally after ``<|python_tag|>``, several calls separated by ``;``.

An output that doesn't start that way (after leading whitespace) is plain content, and so is one whose JSON
isn't a list of calls (as vLLM answers). A stream holds back leading whitespace and a possible start of
``<|python_tag|>`` until the first character decides between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagoda.entrypoints.openai.protocol import DeltaMessage, DeltaToolCall
from pagoda.entrypoints.openai.tool_parsers.abstract_tool_parser import (ExtractedToolCallInformation, ToolParser,
                                                                         ToolParserManager, delta_message)
from pagoda.entrypoints.openai.tool_parsers.json_calls import CallStream, parse_call, skip_whitespace

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


def calls_start(text: str) -> int | None:
    """Where the first call object starts, ``-1`` while the start of the text can't tell yet, ``None`` for
    plain content."""
    i = skip_whitespace(text, 0)
    rest = text[i:]
    if rest.startswith(PYTHON_TAG):
        i = skip_whitespace(text, i + len(PYTHON_TAG))
        return -1 if i == len(text) else (i if text[i] == "{" else None)
    if rest.startswith("{"):
        return i
    return -1 if PYTHON_TAG.startswith(rest) else None


@ToolParserManager.register_module("llama3_json")
class Llama3JsonToolParser(ToolParser):

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self._mode: str | None = None  # "content" or "calls" once the start of the output decides
        self._sent = 0  # content: characters sent
        self._object_start = 0  # calls: where the current call object starts
        self._call: CallStream | None = None
        self._calls = 0

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        start = calls_start(model_output)
        if start is None or start < 0:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        calls, i = [], start
        try:
            while True:
                call, end = parse_call(model_output, i)
                calls.append(call)
                i = skip_whitespace(model_output, end)
                if i == len(model_output):
                    break
                if model_output[i] != SEPARATOR:
                    raise ValueError("calls must be separated by ';'")
                i = skip_whitespace(model_output, i + 1)
        except ValueError:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        return ExtractedToolCallInformation(tools_called=True, tool_calls=calls, content=None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        if self._mode is None:
            start = calls_start(current_text)
            if start == -1:
                return None
            self._mode = "content" if start is None else "calls"
            self._object_start = start or 0
        if self._mode == "content":
            return self._send_content(current_text)
        if self._mode == "failed":
            return None
        calls: list[DeltaToolCall] = []
        text = current_text
        try:
            while self._object_start < len(text):
                if self._call is None:
                    if text[self._object_start] != "{":
                        raise ValueError("expected a call object")
                    self._call = CallStream(self._calls)
                    self._calls += 1
                calls += self._call.update(text, self._object_start)
                if self._call.end is None:
                    break
                i = skip_whitespace(text, self._call.end)
                if i == len(text):
                    break
                if text[i] != SEPARATOR:
                    raise ValueError("calls must be separated by ';'")
                next_start = skip_whitespace(text, i + 1)
                if next_start == len(text):
                    break
                self._object_start, self._call = next_start, None
        except ValueError:
            self._mode = "failed"  # not a list of calls after all: the whole output will read as content
        return delta_message(tool_calls=calls)

    def finish_streaming(self, current_text: str, request: Any) -> DeltaMessage | None:
        if self._mode in (None, "content"):
            return self._send_content(current_text)
        return None

    def _send_content(self, text: str) -> DeltaMessage | None:
        piece, self._sent = text[self._sent:], len(text)
        return delta_message(piece)
