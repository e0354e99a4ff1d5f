"""OpenAI's tool-calling bodies: function definitions in ``tools``, a named ``tool_choice``, the calls in a
response message and their streamed pieces (re-exported by ``protocol.py``)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="the arguments' JSON schema")
    strict: bool | None = None


class ChatCompletionToolsParam(BaseModel):
    """One entry of ``tools``: a function the model may call."""

    model_config = ConfigDict(strict=True)
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str


class ChatCompletionNamedToolChoiceParam(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: the model must call this function."""

    model_config = ConfigDict(strict=True)
    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


def random_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCall(BaseModel):
    """A call the assistant made (in a response, and in the history a client sends back)."""

    id: str = Field(default_factory=random_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed piece of a tool call: ``id``, ``type`` and ``function.name`` in its first piece, then
    ``function.arguments`` in string pieces; ``index`` says which call of the message it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
