"""``POST /v1/completions``: OpenAI's legacy completions API over the engine."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from pagoda.entrypoints.openai.protocol import (MAX_PROMPTS, CompletionChoice, CompletionLogProbs,
                                                CompletionRequest, CompletionResponse, CompletionStreamResponse)
from pagoda.entrypoints.openai.serving_beam_search import beam_search_params
from pagoda.entrypoints.openai.serving_engine import (SSE_DONE, AbortOnCloseStreamingResponse, Accumulated,
                                                      APIError, OpenAIServing, RequestContext, clamp_logprob,
                                                      engine_error, rejected, run_unless_disconnected, sse,
                                                      sse_error, token_text)
from pagoda.entrypoints.openai.structured_outputs import structured_outputs_from_request


class OpenAIServingCompletion(OpenAIServing):

    async def _prompts(self, request: CompletionRequest) -> list[dict[str, Any] | list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError("prompt: must be a non-empty string, list of strings, list of token ids or list of "
                           "token-id lists", 400, "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", 400, "prompt")
        out: list[Any] = []
        for p in prompts:
            if isinstance(p, str):
                # tokenized here (as the engine would) to check the length against max_tokens up front
                ids = await self.encode(p, request.add_special_tokens)
                out.append({"prompt": p, "prompt_token_ids": ids})
            else:
                self.check_token_ids(p, "prompt")
                out.append(list(p))
        return out

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Any:
        """Validate, submit to the engine, and answer with a JSON body or an event stream."""
        start = time.monotonic()
        model, lora = self.resolve_model(request.model)
        self.warn_unknown_fields(request)
        self.check_stream_options(request)
        if request.suffix:
            raise APIError("suffix: not supported", 400, "suffix")
        n = request.n
        best_of = request.best_of
        if best_of is not None and best_of < n:
            raise APIError(f"best_of ({best_of}) must be >= n ({n})", 400, "best_of")
        if best_of is not None and best_of > n and request.stream:
            raise APIError("best_of > n can't be used with stream", 400, "best_of")
        prompts = await self._prompts(request)
        num_seqs = (best_of or n) * len(prompts)
        if num_seqs > MAX_PROMPTS:
            raise APIError(f"this request asks for {num_seqs} sequences (prompts × {'best_of' if best_of else 'n'}); "
                           f"the most allowed is {MAX_PROMPTS}", 400, "n")
        for prompt in prompts:
            ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
            self.check_length(len(ids), request.max_tokens)
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        if request.use_beam_search:
            params = beam_search_params(request, request.max_tokens, self.default_params.temperature)
        else:
            constraint = structured_outputs_from_request(request, self.structured_outputs_config)
            params = self.sampling_params(request, max_tokens=request.max_tokens, n=n, logprobs=request.logprobs,
                                          prompt_logprobs=prompt_logprobs, best_of=best_of,
                                          structured_outputs=constraint)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        group = self.engine.new_group(request_id)
        try:
            await group.add(self.salted(prompts, request.cache_salt), params, lora_request=lora)
        except ValueError as exc:
            raise rejected(exc) from exc
        context = RequestContext(self, request, request_id, model, prompts, start)
        if request.stream:
            return AbortOnCloseStreamingResponse(self._stream(group, context), lambda: context.close(group))
        try:
            response = await run_unless_disconnected(raw_request, self._collect(group, context))
        finally:
            context.close(group)
        if response is None:  # client went away; nobody to answer
            return JSONResponse({}, status_code=499)
        return response

    async def _collect(self, group: Any, ctx: RequestContext) -> CompletionResponse:
        choices: dict[tuple[int, int], Accumulated] = {}
        last: dict[int, Any] = {}  # the latest output of each prompt (prompt text, prompt logprobs)
        try:
            async for index, output in group:
                ctx.observe(index, output)
                last[index] = output
                for delta in output.outputs:
                    choices.setdefault((index, delta.index), Accumulated(delta.index)).add(delta)
        except Exception as exc:  # noqa: BLE001
            ctx.status = "failed"
            raise engine_error(exc) from exc
        request = ctx.request
        result = []
        for (prompt_index, j), choice in sorted(choices.items()):
            output = last[prompt_index]
            prefix = ctx.prompt_text(prompt_index, output) if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs = self._logprobs(output, choice, request.logprobs, prefix)
            result.append(CompletionChoice(index=prompt_index * request.n + j, text=prefix + choice.text,
                                           logprobs=logprobs, finish_reason=choice.finish_reason,
                                           stop_reason=choice.stop_reason))
        ctx.status = "finished"
        return CompletionResponse(id=ctx.request_id, model=ctx.model, choices=result, usage=ctx.usage())

    async def _stream(self, group: Any, ctx: RequestContext) -> AsyncIterator[str]:
        request = ctx.request
        started: set[int] = set()
        done: set[int] = set()
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        try:
            async for index, output in group:
                ctx.observe(index, output)
                for delta in output.outputs:
                    choice = index * request.n + delta.index
                    finished = delta.finish_reason is not None
                    if choice in done or not (delta.text or delta.token_ids or finished):
                        continue
                    first = choice not in started
                    started.add(choice)
                    prefix = ctx.prompt_text(index, output) if request.echo and first else ""
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._logprobs(output, delta, request.logprobs, prefix, with_prompt=first)
                    if finished:
                        done.add(choice)
                    chunk = CompletionStreamResponse(
                        id=ctx.request_id, model=ctx.model, created=ctx.created,
                        choices=[CompletionChoice(index=choice, text=prefix + delta.text, logprobs=logprobs,
                                                  finish_reason=delta.finish_reason,
                                                  stop_reason=delta.stop_reason)],
                        usage=ctx.usage() if continuous else None)
                    yield sse(chunk)
            ctx.status = "finished"
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionStreamResponse(id=ctx.request_id, model=ctx.model, created=ctx.created,
                                                   choices=[], usage=ctx.usage()))
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
            ctx.status = "failed"
            yield sse_error(engine_error(exc))
        yield SSE_DONE

    def _logprobs(self, output: Any, completion: Any, top: int, prefix: str,
                  with_prompt: bool = True) -> CompletionLogProbs:
        """Legacy-format log-probabilities of ``completion``'s tokens (and of the echoed prompt)."""
        result = CompletionLogProbs()
        offset = 0
        if prefix and with_prompt and output.prompt_logprobs is not None:
            for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs):
                _append_position(result, self.tokenizer, token_id, entry, offset)
                offset += len(result.tokens[-1])
        offset = len(prefix)
        for token_id, entry in zip(completion.token_ids, completion.logprobs or []):
            _append_position(result, self.tokenizer, token_id, entry, offset)
            offset += len(result.tokens[-1])
        return result


def _append_position(result: CompletionLogProbs, tokenizer: Any, token_id: int, entry: dict | None,
                     offset: int) -> None:
    chosen = entry.get(token_id) if entry else None
    result.tokens.append(token_text(tokenizer, token_id, chosen))
    result.text_offset.append(offset)
    if entry is None:  # the first prompt token has no log-probability
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        return
    result.token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
    result.top_logprobs.append({token_text(tokenizer, tid, lp): clamp_logprob(lp.logprob)
                                for tid, lp in entry.items()})
