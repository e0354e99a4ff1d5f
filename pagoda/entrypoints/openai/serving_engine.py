"""What the completion and chat handlers share: errors, model-name checks, request → ``SamplingParams``,
client-disconnect handling, request logging and server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from starlette.responses import StreamingResponse

from pagoda.entrypoints.openai.async_engine import (AsyncEngine, EngineDeadError, EngineOverloadedError,
                                                   EngineStepError, EngineStoppedError)
from pagoda.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingFields, UsageInfo
from pagoda.entrypoints.openai.serving_models import OpenAIServingModels
from pagoda.logger import init_logger

logger = init_logger(__name__)

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestEntityTooLarge", 431: "RequestHeaderFieldsTooLarge", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
_INLINE_TOKENIZE_CHARS = 8192  # below this, tokenizing takes well under a millisecond: not worth a thread hop
RETRY_AFTER_S = 1  # what an overloaded server asks clients to wait: the queue moves every engine step
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; clients get a very small finite number instead (as vLLM does)


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param)


_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*): ")


def rejected(exc: ValueError, param: str | None = None) -> APIError:
    """A 400 for a request the engine refused; the engine's messages start with the field they are about
    ("prompt: ...", "cache_salt: ..."), which becomes ``param`` unless one is given."""
    message = str(exc)
    if param is None:
        match = _FIELD_PREFIX.match(message)
        param = match.group(1) if match else None
    return APIError(message, 400, param)


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "Error"), param=param, code=status)
    return ErrorResponse(error=info).model_dump()


@dataclass
class ServerConfig:
    """Front-end settings of ``pagoda serve`` (the engine's are ``EngineArgs``)."""

    served_model_names: list[str]
    chat_template: str | None = None
    max_log_len: int | None = None
    log_requests: bool = True
    api_key: str | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    trust_request_chat_template: bool = False
    # tool calling (see tool_calling.py)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class OpenAIServing:
    """Base of the endpoint handlers: owns the engine handle and the checks every request goes through."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, models: Any = None):
        self.engine = engine
        self.config = config
        # the served names and LoRA adapters, shared by the server's handlers
        self.models = models if models is not None else OpenAIServingModels(engine, config.served_model_names)
        llm_engine = engine.engine
        self.tokenizer = llm_engine.tokenizer
        self.model_config = llm_engine.model_config
        self.max_model_len: int = llm_engine.model_config.max_model_len
        self.vocab_size: int | None = _vocab_size(llm_engine)
        self.default_params = llm_engine.get_default_sampling_params()
        self.structured_outputs_config = llm_engine.config.structured_outputs

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a name this server doesn't serve."""
        return self.resolve_model(name)[0]

    def resolve_model(self, name: str | None) -> tuple[str, Any]:
        """The served name to answer with and the ``LoRARequest`` of the adapter it names (None for the base
        model); 404 for a name this server doesn't serve."""
        try:
            return self.models.resolve(name)
        except KeyError:
            raise APIError(f"The model `{name}` does not exist; this server serves: {', '.join(self.models.names())}",
                           404, "model") from None

    def check_stream_options(self, request: SamplingFields) -> None:
        if request.stream_options is not None and not request.stream:
            raise APIError("stream_options can only be given with stream=true", 400, "stream_options")

    def warn_unknown_fields(self, request: SamplingFields | Any) -> None:
        unknown = request.unknown_fields()
        if unknown:
            logger.warning("ignoring unknown request field(s): %s", ", ".join(unknown))

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if self.vocab_size is None:
            return
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise APIError(f"{param}: token id {token_id} is out of range; the vocabulary has "
                               f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1})", 400, param)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt") -> None:
        """400 when the prompt, or the prompt plus max_tokens, doesn't fit in the context."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens; the prompt has "
                           f"{num_prompt_tokens} tokens, which leaves no room to generate. Shorten the prompt.",
                           400, param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                           "for the completion). Reduce the length of the prompt or max_tokens.", 400, param)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; a long text is tokenized on a worker thread so other requests keep flowing."""
        tokenizer = self.require_tokenizer()
        if len(text) < _INLINE_TOKENIZE_CHARS:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise APIError("this server was started with --skip-tokenizer-init: send token ids, not text", 400)
        return self.tokenizer

    @staticmethod
    def salted(prompts: list[Any], cache_salt: str | None) -> list[Any]:
        """The engine prompts of a request, carrying its ``cache_salt`` (vLLM's prompt field) when it has one."""
        if cache_salt is None:
            return prompts
        return [{**p, "cache_salt": cache_salt} if isinstance(p, dict) else
                {"prompt_token_ids": p, "cache_salt": cache_salt} for p in prompts]

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, request: SamplingFields, *, max_tokens: int | None, n: int,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        best_of: int | None = None, structured_outputs: Any = None) -> Any:
        """``SamplingParams`` from a request; unset fields take the model's generation-config defaults."""
        from pagoda.sampling_params import RequestOutputKind, SamplingParams

        defaults = self.default_params
        def pick(name: str, fallback: Any) -> Any:
            value = getattr(request, name)
            return value if value is not None else getattr(defaults, name, fallback)

        if request.stop_token_ids:
            self.check_token_ids(request.stop_token_ids, "stop_token_ids")
        logit_bias = None
        if request.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in request.logit_bias.items()}
            except ValueError:
                raise APIError("logit_bias: keys must be token ids (integers as strings)", 400, "logit_bias")
            self.check_token_ids(list(logit_bias), "logit_bias")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        kwargs = dict(
            n=n, best_of=best_of, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
            seed=request.seed, stop=stop, stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, max_tokens=max_tokens, min_tokens=request.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            # outputs carry only what is new since the previous step: no per-step copies of the whole text
            output_kind=RequestOutputKind.DELTA,
        )
        if logit_bias:
            kwargs["logit_bias"] = logit_bias
        if structured_outputs is not None:
            kwargs["structured_outputs"] = structured_outputs
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise APIError(str(exc), 400) from exc

    # ------------------------------------------------------------------ logging
    def log_finished(self, request_id: str, prompt: Any, prompt_tokens: int, generated_tokens: int,
                     start: float, status: str) -> None:
        if not self.config.log_requests:
            return
        text = prompt if isinstance(prompt, str) else str(prompt)
        limit = self.config.max_log_len
        if limit is not None and len(text) > limit:
            text = text[:limit] + "…"
        logger.info("%s %s: prompt %d tokens, generated %d tokens, %.3f s, prompt=%r", request_id, status,
                    prompt_tokens, generated_tokens, time.monotonic() - start, text)


class RequestContext:
    """Per-request bookkeeping: token counts for usage and the log line."""

    def __init__(self, serving: OpenAIServing, request: Any, request_id: str, model: str, prompts: list[Any],
                 start: float, log_prompt: Any = None):
        self.serving = serving
        self.request = request
        self.request_id = request_id
        self.model = model
        self.prompts = prompts
        self.start = start
        self.created = int(time.time())
        self.prompt_tokens: dict[int, int] = {}
        self.generated: dict[int, int] = {}
        self.status = "aborted"
        first = prompts[0]
        if isinstance(first, dict):
            first = first.get("prompt") or first.get("prompt_token_ids")
        self.log_prompt = log_prompt if log_prompt is not None else first
        self._closed = False

    def observe(self, index: int, output: Any) -> None:
        """Count a delta output's tokens."""
        self.prompt_tokens[index] = len(output.prompt_token_ids or [])
        self.generated[index] = self.generated.get(index, 0) + sum(len(c.token_ids) for c in output.outputs)

    def prompt_text(self, index: int, output: Any) -> str:
        prompt = self.prompts[index]
        if isinstance(prompt, str):
            return prompt
        return output.prompt if output.prompt is not None else self.serving.require_tokenizer().decode(prompt)

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_tokens.values())
        generated = sum(self.generated.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    def close(self, group: Any) -> None:
        if self._closed:
            return
        self._closed = True
        group.abort()
        self.serving.log_finished(self.request_id, self.log_prompt, sum(self.prompt_tokens.values()),
                                  sum(self.generated.values()), self.start, self.status)


class Accumulated:
    """One choice put together from delta outputs; reads like a ``CompletionOutput``."""

    def __init__(self, index: int):
        self.index = index
        self._texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, delta: Any) -> None:
        self._texts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self._texts)


def _vocab_size(llm_engine: Any) -> int | None:
    size = getattr(llm_engine.model_config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return None


def clamp_logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


def token_text(tokenizer: Any, token_id: int, logprob: Any | None) -> str:
    """The text of one token as logprob entries show it."""
    decoded = getattr(logprob, "decoded_token", None) if logprob is not None else None
    if decoded is not None:
        return decoded
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def sse(payload: Any) -> str:
    """One server-sent event; ``payload`` is a pydantic model or a dict."""
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    status = exc.status if isinstance(exc, APIError) else 500
    message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
    return sse(error_body(message, status))


class AbortOnCloseStreamingResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends (finished, client gone, server stopping),
    so an abandoned stream's engine requests are aborted at once rather than whenever the generator is
    garbage-collected."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def run_unless_disconnected(raw_request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client disconnects first (then ``None`` is returned).

    Cancelling a handler runs its ``finally``, which aborts its engine requests and frees their KV blocks.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nobody reads the result
        pass
    return None


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


def engine_error(exc: BaseException) -> APIError:
    """A failure of the engine as a 500 for the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineStoppedError):
        return APIError(str(exc), 503)
    if isinstance(exc, (EngineDeadError, EngineStepError)):
        return APIError(str(exc), 500)
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(f"internal error: {type(exc).__name__}: {exc}", 500)
