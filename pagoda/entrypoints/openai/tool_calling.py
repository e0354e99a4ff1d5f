"""Tool calling on ``/v1/chat/completions``: ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

- ``"none"`` (the default without tools): the output is plain content.
- ``"auto"`` (the default with tools): the server's ``--tool-call-parser`` reads the calls out of the model's
  free output; only with ``--enable-auto-tool-choice``, as vLLM requires.
- ``"required"``: the output is constrained (``SamplingParams.structured_outputs``) to a JSON array of
  ``{"name": ..., "parameters": ...}`` objects, one of ``tools`` each, at least one (exactly one without
  ``parallel_tool_calls``).
- a named function: the output is constrained to that function's parameters schema and is its arguments.

Each choice of a request gets its own parser (``ToolParser`` interface), for a whole output or a stream.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from pagoda.entrypoints.openai.protocol import (ChatCompletionNamedToolChoiceParam, ChatResponseMessage,
                                                DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                                ToolCall, random_tool_call_id)
from pagoda.entrypoints.openai.serving_engine import APIError, ServerConfig
from pagoda.entrypoints.openai.tool_parsers import ExtractedToolCallInformation, ToolParser, ToolParserManager
from pagoda.entrypoints.openai.tool_parsers.abstract_tool_parser import delta_message
from pagoda.entrypoints.openai.tool_parsers.json_calls import CallStream, skip_whitespace

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def effective_tool_choice(request: Any) -> Any:
    """OpenAI's default: ``"auto"`` when tools are given, ``"none"`` otherwise."""
    if request.tool_choice is not None:
        return request.tool_choice
    return "auto" if request.tools else "none"


def template_tools(request: Any, config: ServerConfig) -> list[dict[str, Any]] | None:
    """The tools the chat template renders into the prompt (vLLM shows them even with ``"none"`` unless
    ``--exclude-tools-when-tool-choice-none``)."""
    tools = getattr(request, "tools", None)
    if not tools:
        return None
    if config.exclude_tools_when_tool_choice_none and getattr(request, "tool_choice", None) == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]


class RequestToolCalling:
    """What tool calling means for one request: its constraint, and a parser per choice."""

    def __init__(self, request: Any, choice: Any, parser_cls: type[ToolParser] | None, tokenizer: Any):
        self.request = request
        self.choice = choice
        self.parser_cls = parser_cls
        self.tokenizer = tokenizer

    @classmethod
    def from_request(cls, request: Any, config: ServerConfig, tokenizer: Any) -> RequestToolCalling | None:
        """Validates ``tools`` / ``tool_choice`` (a 400 naming the field); ``None`` when the output is plain
        content."""
        choice = effective_tool_choice(request)
        if not request.tools:
            if request.tool_choice is not None and request.tool_choice != "none":
                raise APIError("tool_choice: when tool_choice is given, tools must be set", 400, "tool_choice")
            return None
        names = [tool.function.name for tool in request.tools]
        if isinstance(choice, ChatCompletionNamedToolChoiceParam) and choice.function.name not in names:
            raise APIError(f"tool_choice: function {choice.function.name!r} is not in tools (tools has: "
                           f"{', '.join(names)})", 400, "tool_choice")
        if choice == "none":
            return None
        parser_cls = None
        if choice == "auto":
            if not (config.enable_auto_tool_choice and config.tool_call_parser):
                raise APIError('tool_choice: "auto" tool choice requires --enable-auto-tool-choice and '
                               "--tool-call-parser to be set", 400, "tool_choice")
            parser_cls = ToolParserManager.get_tool_parser(config.tool_call_parser)
        calling = cls(request, choice, parser_cls, tokenizer)
        if parser_cls is not None:
            parser_cls(tokenizer).adjust_request(request)
        return calling

    # ------------------------------------------------------------------ constraint
    def structured_outputs(self) -> Any:
        """The constraint that makes ``"required"`` / a named function's output a call (``None`` for auto)."""
        from pagoda.sampling_params import StructuredOutputsParams

        if self.choice == "auto":
            return None
        tools = {tool.function.name: tool.function.parameters or EMPTY_PARAMETERS for tool in self.request.tools}
        if isinstance(self.choice, ChatCompletionNamedToolChoiceParam):
            return StructuredOutputsParams(json=tools[self.choice.function.name], disable_any_whitespace=True)
        return StructuredOutputsParams(json=required_schema(tools, self.request.parallel_tool_calls is not False),
                                       disable_any_whitespace=True)

    def constrain(self, params: Any) -> None:
        constraint = self.structured_outputs()
        if constraint is None:
            return
        if params.structured_outputs is not None:
            raise APIError("tool_choice: a required or named tool choice constrains the output itself and can't "
                           "be combined with response_format", 400, "tool_choice")
        params.structured_outputs = constraint

    # ------------------------------------------------------------------ parsing
    def new_parser(self) -> ToolParser:
        if self.parser_cls is not None:
            return self.parser_cls(self.tokenizer)
        if self.choice == "required":
            return RequiredToolParser(self.tokenizer)
        return NamedToolParser(self.tokenizer, self.choice.function.name)

    def response_message(self, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        """A whole choice's message and finish reason."""
        info = self.new_parser().extract_tool_calls(text, self.request)
        if not info.tools_called:
            return ChatResponseMessage(content=info.content), finish_reason
        calls = info.tool_calls if self.request.parallel_tool_calls is not False else info.tool_calls[:1]
        return ChatResponseMessage(content=info.content, tool_calls=calls), self.finish_reason(finish_reason)

    def finish_reason(self, finish_reason: str | None) -> str | None:
        # OpenAI answers "stop" when it was told which function to call, "tool_calls" when the model chose
        named = isinstance(self.choice, ChatCompletionNamedToolChoiceParam)
        return "tool_calls" if finish_reason == "stop" and not named else finish_reason

    def new_stream(self) -> ToolCallStream:
        return ToolCallStream(self, self.new_parser())


def required_schema(tools: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls to the given tools (at least one; at most one without parallel calls), with each
    tool's ``$defs`` moved to the top so their ``#/$defs/...`` references still resolve."""
    variants, defs = [], {}
    for name, parameters in tools.items():
        parameters = copy.deepcopy(parameters)
        for def_name, definition in parameters.pop("$defs", {}).items():
            if def_name in defs and defs[def_name] != definition:
                raise APIError(f"tools: the parameter schemas define $defs {def_name!r} differently; rename one",
                               400, "tools")
            defs[def_name] = definition
        variants.append({"properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class ToolCallStream:
    """One streamed choice: turns each engine delta into the ``DeltaMessage`` to send (``None``: nothing yet)."""

    def __init__(self, calling: RequestToolCalling, parser: ToolParser):
        self.calling = calling
        self.parser = parser
        self.text = ""
        self.token_ids: list[int] = []
        self.tools_called = False

    def feed(self, delta_text: str, delta_token_ids: Sequence[int], finished: bool) -> DeltaMessage | None:
        previous_text, previous_ids = self.text, list(self.token_ids)
        self.text += delta_text
        self.token_ids.extend(delta_token_ids)
        messages = [self.parser.extract_tool_calls_streaming(previous_text, self.text, delta_text, previous_ids,
                                                             self.token_ids, delta_token_ids, self.calling.request)]
        if finished:
            messages.append(self.parser.finish_streaming(self.text, self.calling.request))
        return self._merge([m for m in messages if m is not None])

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return self.calling.finish_reason(finish_reason) if self.tools_called else finish_reason

    def _merge(self, messages: list[DeltaMessage]) -> DeltaMessage | None:
        content = "".join(m.content or "" for m in messages)
        calls: list[DeltaToolCall] = []
        for message in messages:
            for call in message.tool_calls or []:
                if call.index > 0 and self.calling.request.parallel_tool_calls is False:
                    continue  # parallel_tool_calls false: the first call only
                self.tools_called = True
                if calls and calls[-1].index == call.index and calls[-1].function and call.function and \
                        call.id is None and call.function.name is None:
                    previous = calls[-1].function
                    previous.arguments = (previous.arguments or "") + (call.function.arguments or "")
                else:
                    calls.append(call)
        return delta_message(content, calls)


class RequiredToolParser(ToolParser):
    """``tool_choice: "required"``: the output is a JSON array of ``{"name", "parameters"}`` objects."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self._next = 0  # where the next array element (or the array) starts
        self._call: CallStream | None = None
        self._calls = 0
        self._failed = False

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        try:
            items = json.loads(model_output)
            if not isinstance(items, list) or not items or not all(
                    isinstance(item, dict) and isinstance(item.get("name"), str) for item in items):
                raise ValueError("not a list of calls")
        except ValueError:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        # read as one stream, so a call's arguments are the text the model wrote, as a stream sends them
        message = RequiredToolParser(self.model_tokenizer).extract_tool_calls_streaming(
            "", model_output, model_output, (), (), (), request)
        calls: list[ToolCall] = []
        for delta in message.tool_calls if message else []:
            if delta.id is not None:
                calls.append(ToolCall(id=delta.id, function=FunctionCall(name=delta.function.name, arguments="")))
            calls[delta.index].function.arguments += delta.function.arguments or ""
        return ExtractedToolCallInformation(tools_called=True, tool_calls=calls, content=None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        if self._failed:
            return None
        if self._calls == 0 and self._call is None:
            start = skip_whitespace(current_text, 0)
            if start == len(current_text):
                return None
            if current_text[start] != "[":
                self._failed = True
                return None
            self._next = start + 1
        deltas: list[DeltaToolCall] = []
        try:
            while self._start_element(current_text):
                deltas += self._call.update(current_text, self._next)
                if self._call.end is None:
                    break
                self._next, self._call = self._call.end, None
        except ValueError:
            self._failed = True  # the constraint should make this impossible; send nothing more
        return delta_message(tool_calls=deltas)

    def _start_element(self, text: str) -> bool:
        """Whether an element is under way (starting the next one if it has begun)."""
        if self._call is not None:
            return True
        i = skip_whitespace(text, self._next)
        if i < len(text) and text[i] == ",":
            i = skip_whitespace(text, i + 1)
        if i >= len(text) or text[i] == "]":
            return False
        self._next = i
        self._call = CallStream(self._calls, argument_keys=("parameters",))
        self._calls += 1
        return True


class NamedToolParser(ToolParser):
    """A named ``tool_choice``: the whole output is the named function's arguments."""

    def __init__(self, tokenizer: Any, name: str):
        super().__init__(tokenizer)
        self.name = name
        self._started = False

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        call = ToolCall(function=FunctionCall(name=self.name, arguments=model_output))
        return ExtractedToolCallInformation(tools_called=True, tool_calls=[call], content=None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        if self._started:
            return delta_message(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(
                arguments=delta_text))]) if delta_text else None
        self._started = True
        return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=random_tool_call_id(), type="function",
                                                      function=DeltaFunctionCall(name=self.name,
                                                                                 arguments=delta_text))])
