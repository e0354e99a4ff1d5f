"""Chat messages → prompt text through the tokenizer's chat template (shared by ``LLM.chat`` and the server)."""

from __future__ import annotations

import json
from typing import Any

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer")


def normalize_content(content: Any, index: int) -> str:
    """A message's content as text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"messages[{index}].content: unsupported content part type {kind!r}; only "
                                 "'text' parts are supported")
        return "\n".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts")


def normalize_messages(messages: list[Any]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            message = dict(message)
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ALLOWED_ROLES)}, got {role!r}")
        normalized = {k: v for k, v in message.items() if k not in ("role", "content")}
        normalized["role"] = role
        normalized["content"] = normalize_content(message.get("content"), i)
        if normalized.get("tool_calls"):
            normalized["tool_calls"] = _template_tool_calls(normalized["tool_calls"], i)
        out.append(normalized)
    return out


def _template_tool_calls(tool_calls: list[Any], index: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them: OpenAI sends each call's arguments as a
    JSON string, templates (Hermes, Llama 3, Qwen) expect the object."""
    calls = []
    for j, call in enumerate(tool_calls):
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                raise ValueError(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON string: "
                                 f"{exc}") from exc
        call["function"] = function
        calls.append(call)
    return calls


def apply_chat_template(tokenizer: Any, messages: list[Any], chat_template: str | None = None,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        chat_template_kwargs: dict[str, Any] | None = None,
                        tools: list[dict[str, Any]] | None = None) -> str:
    """Render a conversation to prompt text with the tokenizer's (or the given) Jinja chat template; ``tools``
    (OpenAI's function definitions) are passed to the template, which shows them to the model."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message can't both be true")
    normalized = normalize_messages(messages)
    if continue_final_message and normalized[-1]["role"] != "assistant":
        raise ValueError("continue_final_message needs the last message to be from the assistant")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template (a Jinja string or "
                         "file) to use chat")
    if chat_template and "\n" not in chat_template and chat_template.endswith((".jinja", ".j2", ".txt")):
        with open(chat_template) as f:
            template = f.read()
    kwargs = dict(chat_template_kwargs or {})  # LLM.chat(..., tools=...) passes them this way, as vLLM's does
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(normalized, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, **kwargs)
