"""``LLMEngine``: requests in, outputs out, one ``step()`` at a time.

A step is: schedule (which tokens of which requests run, within the token budget) → run the model on that
flat batch and sample → record the tokens (forking ``n > 1`` requests) → detokenize, check stops, and emit
``RequestOutput``s. The engine is synchronous and single-threaded; the server drives it from one thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagoda.core.beam_search.manager import BeamSearchManager
from pagoda.core.config import EngineConfig
from pagoda.core.generation_config import read_generation_config
from pagoda.core.engine_args import EngineArgs
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.model_runner import ModelRunner
from pagoda.core.output_processor import OutputProcessor
from pagoda.core.request import Request, RequestStatus, child_request_id
from pagoda.core.scheduler import Scheduler
from pagoda.core.structured_output import StructuredOutputManager
from pagoda.core.tokenizer import load_tokenizer
from pagoda.executor.interface import executor_class
from pagoda.logger import init_logger
from pagoda.lora.engine_api import LoRAEngineMixin
from pagoda.outputs import PoolingOutput, PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import BeamSearchParams, SamplingParams
from pagoda.utils import cdiv

logger = init_logger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    spec_decoding: Any = None  # SpecDecodingStats (cumulative) when speculative decoding is on


def _cache_salt(prompt: Any) -> str | None:
    """The prompt's ``cache_salt`` (a dict prompt's key), checked."""
    cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError("cache_salt: must be a non-empty string")
    return cache_salt


def check_beam_search(config: EngineConfig, params: BeamSearchParams) -> None:
    """A beam search this engine can run, or a ``ValueError`` naming what stops it."""
    if config.speculative_config is not None:
        raise ValueError("beam search can't be combined with speculative decoding; start the engine without "
                         "speculative_config to use it")
    budget = config.scheduler.max_num_batched_tokens
    if params.beam_width > budget:
        raise ValueError(f"beam_width: {params.beam_width} beams don't fit the step budget of {budget} tokens they "
                         "must run in together; raise max_num_batched_tokens")


def _sequence_ids(user_id: str, state: Any) -> list[str]:
    """The scheduler's ids of a user request: its own, and its samples' once it forks (``state``: its output
    state, if it still has one)."""
    num = state.num_samples if state is not None else 1
    return [user_id] + [child_request_id(user_id, i) for i in range(num)] if num > 1 else [user_id]


class LLMEngine(LoRAEngineMixin):
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size: an LLMEngine is one replica, got "
                             f"{config.parallel.data_parallel_size}; pagoda.engine_dp.build_engine builds the "
                             "replicas (as LLM(...) and pagoda serve -dp do)")
        self.config = config
        self.model_config = config.model
        platform = config.platform
        self.tokenizer = None if config.model.skip_tokenizer_init else load_tokenizer(config.model)
        self.generation_config = read_generation_config(config.model)
        self.eos_token_ids = self._eos_token_ids()
        # The workers (one per tensor/pipeline-parallel rank) set up their devices and load their parts of the
        # model; the KV cache gets the blocks every rank can hold.
        self.executor = executor_class(config.parallel.distributed_executor_backend)(config, self.tokenizer)
        num_blocks = self.executor.determine_num_kv_blocks()
        config.cache.num_blocks = num_blocks
        self.executor.initialize_cache(num_blocks, self.eos_token_ids)
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, config.speculative_config,
                                   config.lora.max_loras if config.lora is not None else None)
        self.output_processor = OutputProcessor(self.tokenizer, config.model.max_model_len)
        self.structured_output = StructuredOutputManager(config.structured_outputs, self.tokenizer,
                                                         config.model.vocab_size, self.eos_token_ids,
                                                         config.scheduler.max_num_seqs)
        self.beam_search = BeamSearchManager(self.scheduler, self.tokenizer, self.eos_token_ids,
                                             config.model.max_model_len)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._pooling: dict[str, tuple[str | None, list[int]]] = {}  # pooling request id → (prompt, token ids)
        # Scheduled by the current step (the keys: its num_scheduled_tokens); None before scheduling.
        self._step_request_ids: dict[str, int] | None = {}
        logger.info("engine ready: platform %s, attention %s, %d KV blocks of %d tokens (%.2f GiB), "
                    "%d tokens a step", platform.name, config.attention_backend.name, num_blocks,
                    config.cache.block_size, num_blocks * ModelRunner.kv_bytes_per_block(config) / (1 << 30),
                    config.scheduler.max_num_batched_tokens)

    @property
    def runner(self) -> ModelRunner | None:
        """The model runner, when it lives in this process (one process, or an SPMD rank)."""
        return self.executor.driver_runner

    @property
    def pooler(self) -> Any:
        """The model's pooling head (``check(params, task)`` validates a request for it); None for generative
        models."""
        runner = self.runner
        return runner.model.get_pooler() if runner is not None else None  # out of process: generative only

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(EngineConfig.from_engine_args(args))

    # ------------------------------------------------------------------ set-up helpers
    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"),
                       getattr(self.model_config.text_config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    # ------------------------------------------------------------------ requests
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config)

    def tokenize_prompt(self, prompt: str | list[int] | dict[str, Any]) -> tuple[str | None, list[int]]:
        """``(prompt text, prompt token ids)`` for a string, a list of ids, or ``{"prompt"|"prompt_token_ids"}``."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass prompt_token_ids with skip_tokenizer_init")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: str | list[int] | dict[str, Any],
                    params: SamplingParams | PoolingParams | BeamSearchParams,
                    arrival_time: float | None = None, lora_request: Any = None) -> None:
        if request_id in self.output_processor.states or request_id in self._pooling \
                or request_id in self.beam_search.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        lora_request = self.check_lora_request(lora_request)
        if isinstance(params, BeamSearchParams):
            self._add_beam_search_request(request_id, prompt, params, arrival_time, lora_request)
            return
        text, token_ids = self.tokenize_prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ValueError("lora_request: LoRA adapters apply to text generation, not pooling")
            self._add_pooling_request(request_id, text, token_ids, params, prompt, arrival_time)
            return
        if self.model_config.task != "generate":
            raise ValueError(f"this model serves the {self.model_config.task!r} task, not text generation; use "
                             f"LLM.{self.model_config.task}() / PoolingParams")
        self._validate(token_ids, params)
        internal = params.clone()
        if internal.max_tokens is None:
            internal.max_tokens = self.model_config.max_model_len - len(token_ids)
        if (internal.best_of or 1) > internal.n and internal.logprobs is None:
            internal.logprobs = 0  # best_of ranks samples by cumulative logprob
        if internal.structured_outputs is not None:
            self.structured_output.prepare(internal)  # a bad schema, regex or grammar is a ValueError here
        cache_salt = _cache_salt(prompt)
        request = Request(request_id, token_ids, internal, arrival_time, self.eos_token_ids, cache_salt=cache_salt)
        request.lora_request = lora_request
        self.output_processor.add_request(request, text, params)
        # A constrained request whose grammar is still compiling waits in the structured-output manager.
        if internal.structured_outputs is None or self.structured_output.add_request(request):
            self.scheduler.add_request(request)
        self.prompt_tokens_total += len(token_ids)

    def _add_beam_search_request(self, request_id: str, prompt: Any, params: BeamSearchParams,
                                 arrival_time: float | None, lora_request: Any = None) -> None:
        if self.model_config.task != "generate":
            raise ValueError(f"this model serves the {self.model_config.task!r} task, not text generation")
        check_beam_search(self.config, params)
        text, token_ids = self.tokenize_prompt(prompt)
        self._validate(token_ids, SamplingParams(max_tokens=1))
        self.beam_search.add(request_id, text, token_ids, params, arrival_time, _cache_salt(prompt), lora_request)
        self.prompt_tokens_total += len(token_ids)

    def _add_pooling_request(self, request_id: str, text: str | None, token_ids: list[int], params: PoolingParams,
                             prompt: Any, arrival_time: float | None) -> None:
        task = self.model_config.task
        if task == "generate":
            raise ValueError("this model serves text generation, not pooling; load it with task='embed', "
                             "'classify' or 'score' if it supports one")
        self._validate(token_ids, None)
        budget = self.config.scheduler.max_num_batched_tokens
        if len(token_ids) > budget:
            raise ValueError(f"prompt: {len(token_ids)} tokens don't fit the step budget of {budget} tokens that a "
                             "pooling request must run in; raise max_num_batched_tokens")
        type_ids = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
        if type_ids is not None:
            type_ids = list(type_ids)
            if params.truncate_prompt_tokens is not None:  # truncated like the token ids: the last ones stay
                type_ids = type_ids[-params.truncate_prompt_tokens:]
            if len(type_ids) != len(token_ids):
                raise ValueError(f"token_type_ids: {len(type_ids)} ids for a prompt of {len(token_ids)} tokens; "
                                 "give one per token")
        request = Request(request_id, token_ids, params, arrival_time, token_type_ids=type_ids)
        self._pooling[request_id] = (text, token_ids)
        self.scheduler.add_request(request)
        self.prompt_tokens_total += len(token_ids)

    def _validate(self, token_ids: list[int], params: SamplingParams | None) -> None:
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("prompt: the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt: token ids must be in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        generating = params is not None
        if len(token_ids) > max_len or (generating and len(token_ids) == max_len):
            room = ", which leaves no room to generate" if generating else ""
            raise ValueError(f"prompt: the prompt has {len(token_ids)} tokens{room}; the maximum model length is "
                             f"{max_len}")
        blocks_needed = cdiv(len(token_ids) + int(generating), self.config.cache.block_size)
        if blocks_needed > self.config.cache.num_blocks:
            raise ValueError(f"prompt: {len(token_ids)} tokens need {blocks_needed} KV-cache blocks but the cache "
                             f"has {self.config.cache.num_blocks}; give the KV cache more memory")
        if params is None:
            return
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"{name}: {value} is more than max_logprobs ({self.config.max_logprobs}); raise "
                                 "max_logprobs to allow it")
        params.verify_token_ids(vocab)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            self._pooling.pop(rid, None)
            if self.beam_search.groups and self.beam_search.abort(rid):
                continue
            ids = _sequence_ids(rid, self.output_processor.remove(rid))
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            if self.structured_output.pending:
                self.structured_output.discard(ids)

    def warm_up(self, prompt_len: int = 128) -> None:
        """Generate two tokens for one prompt of ``prompt_len`` token ids and forget it (prefix cache and counters
        included), so that the first user request does not pay the one-time costs of the first step: first kernel
        calls, buffers and their page faults (on the CPU, a first 128-token step took 270 ms instead of 90).
        The server calls it on its engine thread before accepting requests; pooling models skip it."""
        if self.model_config.task != "generate" or self.has_unfinished_requests():
            return
        length = max(1, min(prompt_len, self.model_config.max_model_len - 2,
                            self.config.scheduler.max_num_batched_tokens))
        vocab = max(self.model_config.vocab_size, 2)
        counters = self.prompt_tokens_total, self.generation_tokens_total
        self.add_request("pagoda-warm-up", {"prompt_token_ids": [1 + i % (vocab - 1) for i in range(length)]},
                         SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        self.kv_cache.pool.reset_prefix_cache()
        self.prompt_tokens_total, self.generation_tokens_total = counters

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.structured_output.pending)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        self._step_request_ids = None
        ended = self._admit_constrained() if self.structured_output.pending else []
        sched = self.scheduler.schedule()
        self._step_request_ids = sched.num_scheduled_tokens  # its keys (a dict no one changes after scheduling)
        if not sched.total_num_scheduled_tokens:
            self.executor.execute_model(sched)  # still drops finished requests' state
            return ended + self._unschedulable()
        if self.structured_output.matchers:
            sched.grammar_bitmask = self.structured_output.step_bitmask(sched, self.scheduler.requests)
        runner_out = self.executor.execute_model(sched)
        now = time.time()
        for new in sched.new_requests:
            state = self.output_processor.states.get(new.request_id)
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
        self.generation_tokens_total += sum(len(t) for t in runner_out.sampled.values())
        # Beam groups take their rows out first: their tokens are chosen per group, not per request.
        beam_outputs = (self.beam_search.process(runner_out.sampled, runner_out.logprobs)
                        if self.beam_search.groups else [])
        results = self.scheduler.update_from_output(runner_out.sampled, runner_out.spec_token_ids)
        refused = self.structured_output.accept_tokens(results) if self.structured_output.matchers else []
        outputs, finishes = self.output_processor.process(results, runner_out)
        for seq_id, status in finishes:
            self.scheduler.finish_requests([seq_id], status)
        if refused:
            ended += self._end_requests(refused)
        return ended + outputs + beam_outputs + self._pooling_outputs(runner_out.pooled)

    def _admit_constrained(self) -> list[RequestOutput]:
        """Hand the requests whose grammar has compiled to the scheduler (waiting a little for one when nothing
        else can run); end those whose grammar failed to compile."""
        ready, failed = self.structured_output.admit(wait=not self.scheduler.has_unfinished_requests())
        for request in ready:
            self.scheduler.add_request(request)
        return self._end_requests([request for request, _ in failed])

    def _end_requests(self, requests: list[Request]) -> list[RequestOutput]:
        """End the user requests of ``requests`` (every sample) with finish reason ``abort``; their outputs."""
        outputs = []
        for user_id in dict.fromkeys(r.parent_id or r.request_id for r in requests):
            ids = _sequence_ids(user_id, self.output_processor.states.get(user_id))
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            self.structured_output.discard(ids)
            output = self.output_processor.abort(user_id)
            if output is not None:
                outputs.append(output)
        return outputs

    def failed_step_request_ids(self) -> list[str]:
        """After ``step()`` raised: the ids (as given to ``add_request``) of the requests that step was running,
        whose state can no longer be trusted; every unfinished request if it failed before scheduling them.
        Requests that were only waiting are not among them and can still be served."""
        ids = self._step_request_ids
        ids = list(self.scheduler.requests if ids is None else ids)
        requests = self.scheduler.requests
        users = (requests[rid].parent_id or rid if rid in requests else rid for rid in ids)
        return list(dict.fromkeys(users))

    def _pooling_outputs(self, pooled: dict[str, Any]) -> list[PoolingRequestOutput]:
        outputs = []
        for rid, data in pooled.items():
            self.scheduler.finish_requests([rid], RequestStatus.FINISHED_STOPPED)
            entry = self._pooling.pop(rid, None)
            if entry is not None:
                outputs.append(PoolingRequestOutput(rid, PoolingOutput(data), entry[1], True, entry[0]))
        return outputs

    def _unschedulable(self) -> list[RequestOutput]:
        """Nothing could run: if nothing is running either, the head request can never fit; end it."""
        if self.scheduler.num_running or not self.scheduler.waiting:
            return []
        request = self.scheduler.waiting[0]
        logger.warning("request %s needs more KV-cache blocks than the cache has; ending it with 'length'",
                       request.request_id)
        user_id = request.parent_id or request.request_id
        if request.beam_group is not None:
            output = self.beam_search.end_early(user_id)
            return [output] if output is not None else []
        self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_LENGTH)
        output = self.output_processor.abort(user_id, finish_reason="length")
        return [output] if output is not None else []

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self.structured_output.pending),
            kv_cache_usage=self.kv_cache.usage(), num_free_blocks=self.kv_cache.num_free_blocks,
            num_total_blocks=self.config.cache.num_blocks, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            spec_decoding=self._spec_stats())

    def _spec_stats(self) -> Any:
        runner = self.runner  # None with worker processes, which refuse speculative decoding
        return runner.spec.stats.snapshot() if runner is not None and runner.spec is not None else None

    def check_health(self) -> None:
        """Raise :class:`~pagoda.executor.interface.ExecutorDeadError` if a worker is gone (vLLM's name)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the workers; the engine can't step afterwards."""
        self.executor.shutdown()
