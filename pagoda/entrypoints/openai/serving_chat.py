"""``POST /v1/chat/completions``: messages → the chat template → the engine → OpenAI's chat format."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from pagoda.entrypoints.chat_utils import apply_chat_template
from pagoda.entrypoints.openai.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                                ChatCompletionStreamResponse, ChatLogProbs, ChatResponseMessage,
                                                ChatStreamChoice, ChatTokenLogprob, ChatTopLogprob, DeltaMessage)
from pagoda.entrypoints.openai.serving_beam_search import beam_search_params
from pagoda.entrypoints.openai.serving_engine import (SSE_DONE, AbortOnCloseStreamingResponse, Accumulated,
                                                      APIError, OpenAIServing, RequestContext, clamp_logprob,
                                                      engine_error, rejected, run_unless_disconnected, sse,
                                                      sse_error, token_text)
from pagoda.entrypoints.openai.structured_outputs import structured_outputs_from_request
from pagoda.entrypoints.openai.tool_calling import RequestToolCalling, template_tools


class OpenAIServingChat(OpenAIServing):

    async def render_prompt(self, request: Any) -> tuple[str, list[int]]:
        """The conversation as prompt text and token ids (the template carries the special tokens)."""
        tokenizer = self.require_tokenizer()
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        template = self._request_template(request.chat_template) or self.config.chat_template
        try:
            # on a worker thread: a long conversation or a heavy template must not stall other requests
            text = await asyncio.to_thread(apply_chat_template, tokenizer, messages, chat_template=template,
                                           add_generation_prompt=request.add_generation_prompt,
                                           continue_final_message=request.continue_final_message,
                                           chat_template_kwargs=request.chat_template_kwargs,
                                           tools=template_tools(request, self.config))
        except ValueError as exc:
            raise APIError(str(exc), 400, "messages") from exc
        except Exception as exc:  # noqa: BLE001 - a template error is the request's (or the template's) fault
            raise APIError(f"the chat template failed to render these messages: {type(exc).__name__}: {exc}",
                           400, "messages") from exc
        return text, await self.encode(text, request.add_special_tokens)

    def _request_template(self, template: str | None) -> str | None:
        """A chat template sent in a request: only with --trust-request-chat-template, and only as template
        text (a file path would let a client read the server's files)."""
        if template is None:
            return None
        if not self.config.trust_request_chat_template:
            raise APIError("chat_template: this server doesn't accept chat templates in requests (start it with "
                           "--trust-request-chat-template to allow them)", 400, "chat_template")
        if "{" not in template:
            raise APIError("chat_template: must be Jinja template text, not a file name", 400, "chat_template")
        return template

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        start = time.monotonic()
        model, lora = self.resolve_model(request.model)
        self.warn_unknown_fields(request)
        self.check_stream_options(request)
        tools = RequestToolCalling.from_request(request, self.config, self.tokenizer)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs to be true", 400, "top_logprobs")
        text, prompt_ids = await self.render_prompt(request)
        max_tokens = request.max_completion_tokens or request.max_tokens
        self.check_length(len(prompt_ids), max_tokens, "messages")
        # max_tokens None: OpenAI's default, whatever room the context leaves (the engine works it out)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.use_beam_search:  # (it needs a length: the rest of the context by default, like vLLM)
            params = beam_search_params(request, max_tokens or self.max_model_len - len(prompt_ids),
                                        self.default_params.temperature)
        else:
            constraint = structured_outputs_from_request(request, self.structured_outputs_config)
            params = self.sampling_params(request, max_tokens=max_tokens, n=request.n, logprobs=logprobs,
                                          structured_outputs=constraint)
            if tools is not None:
                tools.constrain(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        group = self.engine.new_group(request_id)
        try:
            await group.add(self.salted([{"prompt": text, "prompt_token_ids": prompt_ids}], request.cache_salt),
                            params, lora_request=lora)
        except ValueError as exc:
            raise rejected(exc) from exc
        ctx = RequestContext(self, request, request_id, model, [prompt_ids], start, log_prompt=text)
        if request.stream:
            return AbortOnCloseStreamingResponse(self._stream(group, ctx, tools), lambda: ctx.close(group))
        try:
            response = await run_unless_disconnected(raw_request, self._collect(group, ctx, tools))
        finally:
            ctx.close(group)
        if response is None:
            return JSONResponse({}, status_code=499)
        return response

    async def _collect(self, group: Any, ctx: RequestContext,
                       tools: RequestToolCalling | None) -> ChatCompletionResponse:
        choices: dict[int, Accumulated] = {}
        try:
            async for index, output in group:
                ctx.observe(index, output)
                for delta in output.outputs:
                    choices.setdefault(delta.index, Accumulated(delta.index)).add(delta)
        except Exception as exc:  # noqa: BLE001
            ctx.status = "failed"
            raise engine_error(exc) from exc
        request = ctx.request
        result = []
        for i, choice in sorted(choices.items()):
            logprobs = self._logprobs(choice, request.top_logprobs or 0) if request.logprobs else None
            message, finish_reason = ChatResponseMessage(content=choice.text), choice.finish_reason
            if tools is not None:
                message, finish_reason = tools.response_message(choice.text, finish_reason)
            result.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish_reason,
                                     stop_reason=choice.stop_reason))
        ctx.status = "finished"
        return ChatCompletionResponse(id=ctx.request_id, model=ctx.model, choices=result, usage=ctx.usage())

    async def _stream(self, group: Any, ctx: RequestContext, tools: RequestToolCalling | None) -> AsyncIterator[str]:
        request = ctx.request
        tool_streams = {i: tools.new_stream() for i in range(request.n)} if tools is not None else None
        done: set[int] = set()
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionStreamResponse(id=ctx.request_id, model=ctx.model, created=ctx.created,
                                                    choices=[choice], usage=ctx.usage() if continuous else None))
        try:
            # OpenAI's first event per choice carries the role and no text
            for i in range(request.n):
                yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for index, output in group:
                ctx.observe(index, output)
                for delta in output.outputs:
                    i = delta.index
                    finished = delta.finish_reason is not None
                    if i in done or not (delta.text or delta.token_ids or finished):
                        continue
                    if finished:
                        done.add(i)
                    logprobs = self._logprobs(delta, request.top_logprobs or 0) if request.logprobs else None
                    message, finish_reason = DeltaMessage(content=delta.text), delta.finish_reason
                    if tool_streams is not None:
                        stream = tool_streams[i]
                        message = stream.feed(delta.text, delta.token_ids, finished)
                        finish_reason = stream.finish_reason(finish_reason)
                        if message is None and not finished and logprobs is None:
                            continue  # held back until the parser knows what the text is
                    yield chunk(ChatStreamChoice(index=i, delta=message or DeltaMessage(), logprobs=logprobs,
                                                 finish_reason=finish_reason, stop_reason=delta.stop_reason))
            ctx.status = "finished"
            if request.stream_options and request.stream_options.include_usage:
                yield sse(ChatCompletionStreamResponse(id=ctx.request_id, model=ctx.model, created=ctx.created,
                                                       choices=[], usage=ctx.usage()))
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
            ctx.status = "failed"
            yield sse_error(engine_error(exc))
        yield SSE_DONE

    def _logprobs(self, completion: Any, top: int) -> ChatLogProbs:
        content = []
        for token_id, entry in zip(completion.token_ids, completion.logprobs or []):
            chosen = entry.get(token_id)
            token = token_text(self.tokenizer, token_id, chosen)
            ranked = sorted(entry.items(), key=lambda item: _rank(item[1]))[:top]
            tops = []
            for tid, lp in ranked:
                text = token_text(self.tokenizer, tid, lp)
                tops.append(ChatTopLogprob(token=text, logprob=clamp_logprob(lp.logprob),
                                           bytes=list(text.encode("utf-8"))))
            content.append(ChatTokenLogprob(token=token, bytes=list(token.encode("utf-8")), top_logprobs=tops,
                                            logprob=clamp_logprob(chosen.logprob) if chosen else -9999.0))
        return ChatLogProbs(content=content)


def _rank(logprob: Any) -> float:
    rank = getattr(logprob, "rank", None)
    return rank if rank is not None else -logprob.logprob
