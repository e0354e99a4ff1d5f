"""Turns sampled tokens into user-facing outputs: detokenization, stop decisions, logprobs, n/best_of grouping.

Each user request has one :class:`RequestState`; its samples (one, or ``n``/``best_of`` after the fork) each
have an incremental detokenizer. ``process`` returns the ``RequestOutput``s to emit this step and the
sequences that must finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagoda.core.detokenizer import IncrementalDetokenizer, StopDecision, check_stop, position_logprobs, stop_bounds
from pagoda.core.model_runner import RunnerOutput
from pagoda.core.request import Request, RequestStatus
from pagoda.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}


@dataclass
class SampleState:
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    # check_stop can only stop the sample from this many output tokens on, or on one of these tokens: below the
    # one and off the other, a step needs no call to it (the per-token common case).
    length_limit: float = 0
    stop_token_set: frozenset[int] = frozenset()


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # as the user gave them
    num_samples: int
    return_logprobs: bool  # False when logprobs are computed only to rank best_of samples
    metrics: RequestMetrics
    samples: dict[int, SampleState] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.num_samples and all(s.finish_reason for s in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.states: dict[str, RequestState] = {}

    def add_request(self, request: Request, prompt: str | None, user_params: SamplingParams) -> None:
        params = request.params
        self.states[request.request_id] = RequestState(
            request.request_id, prompt, request.prompt_token_ids, user_params, request.num_samples,
            user_params.logprobs is not None, RequestMetrics(arrival_time=request.arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def remove(self, request_id: str) -> RequestState | None:
        return self.states.pop(request_id, None)

    def abort(self, request_id: str, finish_reason: str = "abort") -> RequestOutput | None:
        """End a request early: unfinished samples get ``finish_reason``; returns its final output."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for sample in state.samples.values():
            sample.finish_reason = sample.finish_reason or finish_reason
        return self._make_output(state, finished=True, force=True)

    def process(self, results: list[tuple[Request, list[int]]], runner_out: RunnerOutput,
                ) -> tuple[list[RequestOutput], list[tuple[str, RequestStatus]]]:
        now = time.time()
        touched: dict[str, RequestState] = {}
        finishes: list[tuple[str, RequestStatus]] = []
        for rid, entries in runner_out.prompt_logprobs.items():
            state = self.states.get(rid)
            if state is not None and state.prompt_logprobs is not None:
                room = len(state.prompt_token_ids) - len(state.prompt_logprobs)  # recomputation adds nothing
                num = state.params.prompt_logprobs
                state.prompt_logprobs.extend(position_logprobs(ids, lps, rank, num, self.tokenizer)
                                             for ids, lps, rank in entries[:room])
        decided: set[str] = set()  # user requests with a sample that finished this step
        states, max_model_len = self.states, self.max_model_len
        for request, new_tokens in results:
            user_id = request.parent_id or request.request_id
            state = states.get(user_id)
            if state is None:
                continue
            sample = state.samples.get(request.index)
            if sample is None:
                # Only the final text is returned: decode once at the end (same text; see the detokenizer).
                defer = state.params.output_kind == RequestOutputKind.FINAL_ONLY
                limit, stops = stop_bounds(request.params, request.eos_token_ids,
                                           num_prompt_tokens=request.num_prompt_tokens, max_model_len=max_model_len)
                sample = state.samples[request.index] = SampleState(
                    request.index,
                    IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params, defer=defer),
                    [] if request.params.logprobs is not None else None,
                    0.0 if request.params.logprobs is not None else None, length_limit=limit, stop_token_set=stops)
            metrics = state.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                state.num_cached_tokens = max(request.num_cached_tokens, 0)
            metrics.last_token_time = now
            if sample.logprobs is not None:
                lp = runner_out.logprobs.get(request.request_id)
                if lp is not None:
                    ids, lps, rank = lp
                    sample.logprobs.append(position_logprobs(ids, lps, rank, request.params.logprobs,
                                                             self.tokenizer))
                    sample.cumulative_logprob += lps[0]
            outputs_so_far = request.output_token_ids
            if 0 < len(outputs_so_far) < sample.length_limit and outputs_so_far[-1] not in sample.stop_token_set:
                token_stop = None
            else:
                token_stop = check_stop(request.params, outputs_so_far, request.eos_token_ids,
                                        num_prompt_tokens=request.num_prompt_tokens, max_model_len=max_model_len)
            decision: StopDecision | None = sample.detokenizer.process(new_tokens, token_stop)
            if decision is not None:
                sample.finish_reason, sample.stop_reason = decision.finish_reason, decision.stop_reason
                finishes.append((request.request_id, _STATUS[decision.finish_reason]))
                decided.add(user_id)
                touched[user_id] = state
            elif state.params.output_kind != RequestOutputKind.FINAL_ONLY:
                touched[user_id] = state  # final-only requests have nothing to say until a sample finishes
        outputs = []
        for user_id, state in touched.items():
            finished = user_id in decided and state.finished  # finishing takes a decision in this step
            if finished:
                state.metrics.finished_time = now
                del states[user_id]
            elif state.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue  # another sample is still running
            output = self._make_output(state, finished)
            if output is not None:
                outputs.append(output)
        return outputs, finishes

    def _make_output(self, state: RequestState, finished: bool, force: bool = False) -> RequestOutput | None:
        kind = state.params.output_kind
        if (kind == RequestOutputKind.FINAL_ONLY or state.num_samples > state.params.n) and not finished and not force:
            return None
        delta = kind == RequestOutputKind.DELTA
        samples = list(state.samples.values())
        if len(samples) > 1:
            samples.sort(key=lambda s: s.index)
        if state.num_samples > state.params.n:  # best_of: keep the n most likely samples
            samples = sorted(samples, key=lambda s: -(s.cumulative_logprob or 0.0))[:state.params.n]
        completions = []
        for position, sample in enumerate(samples):
            detok = sample.detokenizer
            token_ids = detok.token_ids[sample.num_sent_tokens:] if delta else list(detok.token_ids)
            logprobs = sample.logprobs
            if logprobs is not None and delta:
                logprobs = logprobs[sample.num_sent_tokens:]
            if not state.return_logprobs:
                logprobs = None
            sample.num_sent_tokens = len(detok.token_ids)
            completions.append(CompletionOutput(
                index=sample.index if state.num_samples == state.params.n else position,
                text=detok.get_next_output_text(sample.finish_reason is not None, delta),
                token_ids=token_ids,
                cumulative_logprob=sample.cumulative_logprob if state.return_logprobs else None,
                logprobs=logprobs, finish_reason=sample.finish_reason, stop_reason=sample.stop_reason))
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, prompt_logprobs=state.prompt_logprobs,
                             outputs=completions, finished=finished, metrics=state.metrics,
                             num_cached_tokens=state.num_cached_tokens)
