"""Request and response bodies of the OpenAI-compatible server (OpenAI's schema plus vLLM's extra fields).

Requests accept unknown fields (clients such as LangChain send fields we have no use for) and the server logs
them at WARNING; fields whose meaning we can't honour (``suffix``) are rejected with a 400 instead of being silently
dropped.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# the tool-calling bodies live beside this module; imported here so both paths name them, as vLLM's protocol does
from pagoda.entrypoints.openai.tool_protocol import (ChatCompletionNamedFunction,  # noqa: F401
                                                     ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam,
                                                     DeltaFunctionCall, DeltaToolCall, FunctionCall,
                                                     FunctionDefinition, ToolCall, random_tool_call_id)

MAX_N = 128  # caps n and best_of so one request can't occupy the whole batch
MAX_PROMPTS = 1024  # prompts in one /v1/completions request


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


class OpenAIBaseModel(BaseModel):
    # strict: a value of the wrong JSON type is a 400 naming the field, as OpenAI answers, never coerced
    # ("stream": "yes" is not true, "max_tokens": "5" or 5.0 is not 5); an int is still a valid float.
    # NaN and ±Infinity (which Python's JSON parser accepts) would reach the sampler's arithmetic.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---------------------------------------------------------------------------- errors and models
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error, as ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class ModelPermission(BaseModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


# ---------------------------------------------------------------------------- sampling fields shared by both APIs
class SamplingFields(OpenAIBaseModel):
    """OpenAI's sampling fields plus vLLM's extras; ``None`` means the model's generation-config default."""

    model: str | None = Field(default=None, description="served model name (default: the first one)")
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = Field(default=None, min_length=1,
                                   description="prefix-cache blocks are shared only between requests with the "
                                               "same salt (e.g. one per tenant)")
    # vLLM's output constraints (one per request; see entrypoints/openai/structured_outputs.py)
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="json, regex, choice, grammar, json_object or structural_tag, with "
                                  "disable_any_whitespace, disable_additional_properties, whitespace_pattern")
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = Field(default=None, description="xgrammar or auto")
    guided_whitespace_pattern: str | None = None
    # vLLM's beam search: n is the beam width (see docs/decoding.md)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty")
    @classmethod
    def _float32_value(cls, value: float | None) -> float | None:
        return _check_float32(value)

    @field_validator("logit_bias")
    @classmethod
    def _float32_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for bias in (value or {}).values():
            _check_float32(bias)
        return value


def _check_float32(value: float | None) -> float | None:
    """Sampling runs in 32-bit floats: a value that becomes 0 or inf there (1e-300, 1e300) would turn the
    logits into NaN, so it is refused here rather than left to fail inside the shared engine step."""
    if value is not None and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{value} is not representable as a 32-bit float (magnitude must be 0 or within "
                         f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}])")
    return value


# ---------------------------------------------------------------------------- /v1/completions
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    max_tokens: int | None = Field(default=16, ge=1, description="tokens to generate per choice (default 16)")
    best_of: int | None = Field(default=None, ge=1, le=MAX_N,
                                description="sample best_of choices and return the n with the highest "
                                            "cumulative log-probability (not with stream)")
    logprobs: int | None = Field(default=None, ge=0, description="log-probabilities of this many top tokens")
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True
    response_format: ResponseFormat | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(default=None, description="the stop string or token id that ended "
                                                                     "the choice, if any")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    """One server-sent event of a streamed completion (the same shape as the full response)."""


# ---------------------------------------------------------------------------- /v1/chat/completions
class TextContentPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = Field(min_length=1)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, any JSON object, or JSON following ``json_schema.schema``."""

    model_config = ConfigDict(strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = Field(
        default=None, description="default: 'auto' when tools are given, else 'none'")
    parallel_tool_calls: bool | None = True
    # vLLM extras
    chat_template: str | None = Field(default=None, description="Jinja template overriding the model's")
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------- /tokenize and /detokenize
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
