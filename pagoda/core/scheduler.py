"""Continuous batching with one token budget per step.

There is no prefill or decode phase: each request has ``num_computed_tokens`` (in the KV cache) and
``num_tokens`` (prompt plus outputs), and a step gives each running request, then each waiting one, as many of
its missing tokens as the budget allows — a decode is one token, a prompt may be cut into chunks, a prefix-cache
hit skips tokens. When the cache runs out of blocks, the most recently admitted running request is preempted
(its blocks freed, to be recomputed later) — first come, first served.

The scheduler tells the model runner what to run with a small message (:class:`SchedulerOutput`): new
requests in full, running ones only as what changed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pagoda.core.beam_search.scheduling import BeamGroupScheduling, is_beam_group
from pagoda.core.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus, child_request_id, sample_params
from pagoda.core.spec_decode.scheduling import drafts_to_schedule, record_verified
from pagoda.lora.scheduling import LoRAAdmission
from pagoda.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner hasn't seen (or must rebuild after preemption or a fork)."""

    request_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_samples: int  # > 1: the runner samples this many tokens from the last position (fork)
    token_type_ids: list[int] | None = None
    lora_request: Any = None  # the request's LoRA adapter, or None


class CachedRequestData(NamedTuple):
    """A running request the runner already has: only what changed (a named tuple: one is built per running
    request per step)."""

    request_id: str
    num_computed_tokens: int
    block_ids: list[int] | None  # the full block list when it changed, else None


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_request_ids: set[str] = field(default_factory=set)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    blocks_to_zero: list[int] = field(default_factory=list)  # first use of a block of the uninitialized cache
    grammar_bitmask: Any = None  # the structured-output masks of this step's constrained rows (a StepGrammar)
    #: request id → the draft tokens verified with its last token this step (speculative decoding)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)


class Scheduler(BeamGroupScheduling):
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, speculative: Any = None,
                 max_loras: int | None = None) -> None:
        self.config = config
        self.max_loras = max_loras  # distinct LoRA adapters one step may run (None: LoRA off)
        self.speculative = speculative  # a SpeculativeConfig, or None
        # KV slots reserved past a request's scheduled tokens for the draft model's proposals.
        self.num_lookahead = speculative.num_lookahead_slots if speculative is not None else 0
        self._verifying: dict[str, list[int]] = {}  # the drafts scheduled in the last step
        self.kv = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()  # told to the runner with the next step
        self._known_blocks: dict[str, int] = {}  # per running request: block count the runner knows
        self.num_preemptions_total = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        finished = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._known_blocks.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.beam_group is not None and is_beam_group(request):  # its beams run together or not at all
                num_group, preempted_any, preempted_self = self._schedule_running_group(i, budget, out, scheduled)
                preempted = preempted or preempted_any
                if preempted_self:
                    break
                budget -= num_group
                i += len(request.beam_group.beams)
                continue
            num_new = len(request.all_token_ids) - request.num_computed_tokens
            if num_new > budget or num_new <= 0:  # the common case, a decode, needs none of the chunking rules
                num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            drafts = None
            if request.spec_token_ids and num_new == 1:
                drafts = drafts_to_schedule(request, budget - 1, self.config.max_model_len)
                num_new += len(drafts)
            while not self.kv.allocate_slots(request, num_new + self.num_lookahead):
                victims = self._preempt_last()  # the most recently admitted request (or beam group)
                preempted = True
                if request in victims:
                    break
            else:
                scheduled.append(request)
                out.num_scheduled_tokens[request.request_id] = num_new
                if drafts:
                    out.scheduled_spec_decode_tokens[request.request_id] = drafts
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing after it can run either

        loras, passed_over = None, []  # LoRAAdmission once a waiting request has an adapter
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.lora_request is not None and self.max_loras:
                loras = loras or LoRAAdmission(self.max_loras, self.running)
                if not loras.fits(request):  # its adapter would be one too many for the slots this step
                    if request.beam_group is not None:
                        break
                    passed_over.append(self.waiting.popleft())
                    continue
                loras.admitted(request)
            if request.beam_group is not None and is_beam_group(request):
                num_group = self._admit_group(budget, out, scheduled)
                if not num_group:
                    break
                budget -= num_group
                continue
            hits = self.kv.get_computed_blocks(request) if request.num_computed_tokens == 0 else []
            num_cached = len(hits) * self.kv.block_size
            num_new = self._num_new_tokens(request, budget, num_cached)
            if num_new == 0 or not self.kv.allocate_slots(request, num_new + self.num_lookahead, hits):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._known_blocks.pop(request.request_id, None)  # (re)sent in full
            scheduled.append(request)
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

        if passed_over:
            self.waiting.extendleft(reversed(passed_over))
        copied = {dst for _, dst in self.kv.pending_copies}
        req_blocks, known_blocks, num_scheduled = self.kv.req_blocks, self._known_blocks, out.num_scheduled_tokens
        cached_requests = out.cached_requests
        for request in scheduled:
            rid = request.request_id
            blocks = req_blocks[rid]
            known = known_blocks.get(rid)
            if known is None:
                out.new_requests.append(NewRequestData(
                    rid, list(request.all_token_ids), request.num_prompt_tokens, request.params,
                    [b.block_id for b in blocks], request.num_computed_tokens, request.num_samples,
                    request.token_type_ids, request.lora_request))
            else:
                # The block list is only sent when it changed: a block was added, or copied on write.
                changed = len(blocks) != known or (copied and blocks[-1].block_id in copied)
                cached_requests.append(CachedRequestData(rid, request.num_computed_tokens,
                                                         [b.block_id for b in blocks] if changed else None))
            known_blocks[rid] = len(blocks)
            request.num_computed_tokens += num_scheduled[rid]
        out.block_copies = self.kv.take_pending_copies()
        out.blocks_to_zero = self.kv.take_fresh_blocks()
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        self._verifying = out.scheduled_spec_decode_tokens
        return out

    def _num_new_tokens(self, request: Request, budget: int, num_cached: int = 0) -> int:
        num_new = request.num_tokens - request.num_computed_tokens - num_cached
        if num_new > budget:
            if not self.config.enable_chunked_prefill or request.is_pooling:  # poolers need the whole prompt
                return 0
            num_new = budget
        return max(num_new, 0)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks; it goes back to the front of the queue and is recomputed later."""
        self.kv.free(request)
        # Resent in full on resume; the runner keeps the request's sampling state (its seeded generator).
        self._known_blocks.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after the step
    def update_from_output(self, sampled: dict[str, list[int]],
                           spec_token_ids: dict[str, list[int]] | None = None) -> list[tuple[Request, list[int]]]:
        """Record sampled tokens. Returns ``(request, new_token_ids)`` pairs; a request with ``n > 1`` is replaced
        by its samples here (each sharing the prompt's blocks), which are returned instead of it. With
        speculative decoding, ``spec_token_ids`` are the next drafts of requests that got tokens."""
        results = []
        verifying, self._verifying = self._verifying, {}
        speculative = self.speculative is not None
        for request in list(self.running):
            tokens = sampled.get(request.request_id)
            if speculative and tokens:
                request.spec_token_ids = spec_token_ids.get(request.request_id, []) if spec_token_ids else []
                if request.request_id in verifying:
                    if record_verified(self.kv, request, tokens, self.num_lookahead):
                        # A later allocation may bring the count back with other blocks: resend the list.
                        self._known_blocks[request.request_id] = -1
                    results.append((request, tokens))
                    continue
            self.kv.cache_computed_blocks(request)
            if not tokens:
                continue
            if len(tokens) == 1:
                request.append_token(tokens[0])
                results.append((request, tokens))
            else:
                for child in self._fork(request, tokens):
                    if spec_token_ids:
                        child.spec_token_ids = spec_token_ids.get(child.request_id, [])
                    results.append((child, child.output_token_ids[-1:]))
        return results

    def _fork(self, parent: Request, tokens: list[int]) -> list[Request]:
        children = []
        position = self.running.index(parent)
        for index, token in enumerate(tokens):
            child = Request(child_request_id(parent.request_id, index), parent.prompt_token_ids,
                            sample_params(parent.params, index),
                            parent.arrival_time, parent.eos_token_ids, parent_id=parent.request_id, index=index,
                            cache_salt=parent.cache_salt)
            child.num_cached_tokens = parent.num_cached_tokens
            child.lora_request = parent.lora_request
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
            self.kv.fork(parent, child)
            child.append_token(token)
            self.requests[child.request_id] = child
            children.append(child)
        self.running[position:position + 1] = children
        del self.requests[parent.request_id]
        self._free(parent)
        return children
