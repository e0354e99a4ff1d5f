"""``hermes``: tool calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes 2 Pro,
Qwen 2.5 / 3 and the models trained on their format), with free text around them.

The content is the text outside the blocks; when the output calls tools, its trailing whitespace (the newlines
between and after blocks) is dropped, and content that is only whitespace is ``None``. A block whose JSON is
not a call makes the whole output plain content, as vLLM answers. A stream holds back trailing whitespace and
a possible start of ``<tool_call>`` until what follows decides, so its pieces add up to the whole extraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagoda.entrypoints.openai.protocol import DeltaMessage, DeltaToolCall
from pagoda.entrypoints.openai.tool_parsers.abstract_tool_parser import (ExtractedToolCallInformation, ToolParser,
                                                                         ToolParserManager, delta_message)
from pagoda.entrypoints.openai.tool_parsers.json_calls import CallStream, parse_call, skip_whitespace

START, END = "<tool_call>", "</tool_call>"


def held_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (it may become the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


@ToolParserManager.register_module("hermes")
class Hermes2ProToolParser(ToolParser):

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self._pos = 0  # everything before this has been sent or is held in _pending_space
        self._pending_space = ""
        self._block_start: int | None = None  # where the open block's body starts
        self._call: CallStream | None = None
        self._calls = 0
        self._failed = False

    def adjust_request(self, request: Any) -> Any:
        # some tokenizers mark <tool_call> as a special token: the detokenizer must keep it
        if request.tools and request.tool_choice != "none":
            request.skip_special_tokens = False
        return request

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        if START not in model_output:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        outside, calls, pos = [], [], 0
        try:
            while (start := model_output.find(START, pos)) != -1:
                outside.append(model_output[pos:start])
                call, call_end = parse_call(model_output, skip_whitespace(model_output, start + len(START)))
                # the block ends after the object (a "</tool_call>" inside its strings is just text)
                after = skip_whitespace(model_output, call_end)
                if model_output.startswith(END, after):
                    pos = after + len(END)
                elif after == len(model_output):
                    pos = after  # the output ended without closing the block
                else:
                    raise ValueError("text after the call object inside <tool_call>")
                calls.append(call)
        except ValueError:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        outside.append(model_output[pos:])
        content = "".join(outside).rstrip()
        return ExtractedToolCallInformation(tools_called=True, tool_calls=calls, content=content or None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        if self._failed:
            return None
        content: list[str] = []
        calls: list[DeltaToolCall] = []
        text = current_text
        try:
            while True:
                if self._block_start is None:
                    start = text.find(START, self._pos)
                    if start == -1:
                        safe = len(text) - held_tag_prefix(text, START)
                        self._add_content(text[self._pos:safe], content)
                        self._pos = max(self._pos, safe)
                        break
                    self._add_content(text[self._pos:start], content)
                    self._block_start = start + len(START)
                    self._call = CallStream(self._calls)
                    self._calls += 1
                    self._pos = self._block_start
                body = skip_whitespace(text, self._block_start)
                if body == len(text):
                    break
                calls += self._call.update(text, body)
                if self._call.end is None:
                    break
                after = skip_whitespace(text, self._call.end)
                if not text.startswith(END, after):
                    if END.startswith(text[after:]):
                        break  # the closing tag may still be arriving
                    raise ValueError("text after the call object inside <tool_call>")
                self._block_start = None
                self._pos = after + len(END)
        except ValueError:
            self._failed = True  # not a call after all: the whole output will read as content
        return delta_message("".join(content), calls)

    def finish_streaming(self, current_text: str, request: Any) -> DeltaMessage | None:
        if self._failed or self._block_start is not None:
            return None
        rest = self._pending_space + current_text[self._pos:]
        self._pending_space, self._pos = "", len(current_text)
        return delta_message(rest.rstrip() if self._calls else rest)

    def _add_content(self, text: str, out: list[str]) -> None:
        if not text:
            return
        text = self._pending_space + text
        kept = text.rstrip()
        self._pending_space = text[len(kept):]
        if kept:
            out.append(kept)
