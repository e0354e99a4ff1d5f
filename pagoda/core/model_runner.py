"""Runs one scheduled step: builds the flat batch, runs the model, samples.

The runner keeps a persistent state per request (its tokens, blocks and sampling state) and receives only what
changed each step. Inputs are built with array operations over the whole batch — no per-token Python work —
and logits are computed only for rows that sample (plus prompt positions where prompt logprobs were asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from pagoda.core.block_table_rows import BlockTableRows, block_runs
from pagoda.core.config import EngineConfig
from pagoda.core.flat_batch import decode_batch_metadata, flat_batch_layout
from pagoda.core.pipeline_step import PipelineStage, stage_num_layers
from pagoda.core.request import child_request_id, sample_params
from pagoda.core.sampler import (LogprobsTensors, Sampler, SamplingRequestState, compute_prompt_logprobs,
                                 make_generator)
from pagoda.core.scheduler import NewRequestData, SchedulerOutput
from pagoda.core.spec_decode.decoder import SpecDecoder
from pagoda.core.spec_decode.draft_model import draft_kv_bytes_per_block
from pagoda.lora.manager import make_lora_manager
from pagoda.models.interface import PagodaModel
from pagoda.ops import current_ops, use_ops
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams | PoolingParams
    block_ids: list[int]
    num_computed_tokens: int
    sampling: list[SamplingRequestState]  # one per sample: several only for a request about to fork; none to pool
    token_type_ids: list[int] | None = None
    block_row: int = -1  # this request's row of the runner's persistent block table
    lora_request: Any = None  # the request's LoRA adapter (a LoRARequest), or None for the base model


@dataclass
class RunnerOutput:
    #: request id → sampled tokens (n of them for a request that forks)
    sampled: dict[str, list[int]] = field(default_factory=dict)
    #: sequence id (child id for forks) → (token ids, logprobs, rank) of its sampled token; column 0 is the sampled
    logprobs: dict[str, tuple[list[int], list[float], int]] = field(default_factory=dict)
    #: request id → prompt logprobs of this step's prompt positions, in order
    prompt_logprobs: dict[str, list[tuple[list[int], list[float], int]]] = field(default_factory=dict)
    #: request id → pooled output (float32, on the host) of a pooling request
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    #: request id → draft tokens proposed for the next step (speculative decoding)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: PagodaModel, num_blocks: int, eos_token_ids: set[int],
                 bad_words_encoder: Any = None) -> None:
        self.config = config
        self.model = model
        self.greedy_head = True  # all-greedy steps ask the model's compute_greedy first (tests switch it off)
        self.device = config.platform.device()
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        self.bad_words_encoder = bad_words_encoder
        mc = config.model
        self.causal = not mc.is_encoder_only
        self.kv_caches: list[torch.Tensor | None]
        self._zero_fresh_blocks = False
        if mc.is_encoder_only:  # encoders attend within the step's tokens only: no cache at all
            self.kv_caches = [None] * mc.num_layers
        else:
            shape = config.attention_backend.kv_cache_shape(num_blocks, self.block_size,
                                                            config.attention.num_kv_heads, mc.head_size)
            # Memory that reads as zeros where the platform has it; else uninitialized, each block zeroed on first
            # use (SchedulerOutput.blocks_to_zero), not all up front.
            self.kv_caches = []
            for _ in range(stage_num_layers(config)):  # this pipeline stage's layers
                cache = config.platform.zeroed_empty(shape, mc.dtype)
                if cache is None:
                    cache = torch.empty(shape, dtype=mc.dtype, device=self.device)
                    cache[:, 0] = 0  # block tables are padded with block 0
                    self._zero_fresh_blocks = True
                self.kv_caches.append(cache)
        self.uses_token_type_ids = model.uses_token_type_ids
        with use_ops(config.ops or current_ops()):
            self.attn_builder = config.attention_backend.builder_cls()(config.attention, self.device)
        # Adapter slots first: a fused decode step applies them too.
        self.lora = make_lora_manager(config, model, config.ops or current_ops(), self.device)
        # The platform may take over whole decode steps (the CPU's counterpart of CUDA-graph capture).
        pipelined = config.parallel.pipeline_parallel_size > 1
        stack = None if mc.is_encoder_only or pipelined else model.decoder_stack()
        self.fused_decode = (config.platform.fused_decode(stack, config.ops, self.kv_caches)
                             if stack is not None and config.ops is not None else None)
        model.use_fused_decode(self.fused_decode)
        self._lora_requests: set[str] = set()  # requests with an adapter: while none, steps do no LoRA work
        self.sampler = Sampler()
        self.states: dict[str, RunnerRequestState] = {}
        # Requests that are not plain one-sample generation (pooling, prompt logprobs, about to fork): while there
        # are none, a step skips the passes over the batch that look for them.
        self._unusual: set[str] = set()
        # Requests whose sampling is not plain greedy (see SamplingRequestState.is_plain_greedy): while there are
        # none, a step needs no pass over the batch to know that the LM head's argmax is all it needs.
        self._not_plain_greedy: set[str] = set()
        self.block_rows = BlockTableRows(config.scheduler.max_num_seqs,
                                         -(-config.model.max_model_len // self.block_size))
        self.spec = SpecDecoder(config, self) if config.speculative_config is not None else None
        self.pipeline = PipelineStage(config, self) if pipelined else None

    @staticmethod
    def kv_bytes_per_block(config: EngineConfig) -> int:
        mc = config.model
        if mc.is_encoder_only:
            return 0
        # this rank's KV heads (config.attention's): under tensor parallelism each rank caches its own heads only
        per_token = 2 * config.attention.num_kv_heads * mc.head_size * torch.empty(0, dtype=mc.dtype).element_size()
        return per_token * config.cache.block_size * stage_num_layers(config) + draft_kv_bytes_per_block(config)

    # ------------------------------------------------------------------ state
    def _sampling_state(self, params: SamplingParams, prompt: list[int], outputs: list[int]) -> SamplingRequestState:
        bad_words = self.bad_words_encoder(params.bad_words) if params.bad_words and self.bad_words_encoder else []
        return SamplingRequestState(params, prompt, list(outputs), make_generator(params.seed, self.device),
                                    set() if params.ignore_eos else self.eos_token_ids, bad_words)

    def _add_request(self, new: NewRequestData) -> None:
        prompt, outputs = new.token_ids[:new.num_prompt_tokens], new.token_ids[new.num_prompt_tokens:]
        state = self.states.get(new.request_id)
        if state is not None:  # resumed after preemption, or a forked sample whose sampling state exists
            state.token_ids = list(new.token_ids)
            self._set_blocks(state, new.block_ids)
            state.num_computed_tokens = new.num_computed_tokens
            return
        if isinstance(new.params, PoolingParams):
            sampling = []
        elif new.num_samples > 1:
            sampling = [self._sampling_state(sample_params(new.params, index), prompt, outputs)
                        for index in range(new.num_samples)]
        else:
            sampling = [self._sampling_state(new.params, prompt, outputs)]
        if len(sampling) != 1 or new.params.prompt_logprobs is not None:
            self._unusual.add(new.request_id)
        if not all(s.is_plain_greedy for s in sampling):
            self._not_plain_greedy.add(new.request_id)
        self.states[new.request_id] = RunnerRequestState(new.request_id, list(new.token_ids), new.num_prompt_tokens,
                                                         new.params, list(new.block_ids), new.num_computed_tokens,
                                                         sampling, new.token_type_ids,
                                                         self.block_rows.add(new.block_ids), new.lora_request)
        if new.lora_request is not None:
            self._lora_requests.add(new.request_id)

    def _set_blocks(self, state: RunnerRequestState, block_ids: list[int]) -> None:
        state.block_ids = list(block_ids)
        self.block_rows.set(state.block_row, block_ids)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:
            state = self.states.pop(rid, None)
            self._unusual.discard(rid)
            self._not_plain_greedy.discard(rid)
            self._lora_requests.discard(rid)
            if state is not None:
                self.block_rows.release(state.block_row)
            if self.spec is not None:
                self.spec.remove_request(rid)
        for new in sched.new_requests:
            self._add_request(new)
            if self.spec is not None:
                self.spec.add_request(self.states[new.request_id])
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.block_ids is not None:
                self._set_blocks(state, cached.block_ids)
        # Slices, not an index tensor: on CPU, assigning through an index tensor on dimension 1 of the cache costs
        # ~100x more (20 ms per layer for 64 blocks). Fresh blocks mostly come in runs of consecutive ids.
        if sched.blocks_to_zero and self.causal and self._zero_fresh_blocks:
            for start, stop in block_runs(sched.blocks_to_zero):
                for cache in self.kv_caches:
                    cache[:, start:stop] = 0
        if sched.block_copies and self.causal:
            for src, dst in sched.block_copies:
                for cache in self.kv_caches:
                    cache[:, dst] = cache[:, src]

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        out = RunnerOutput()
        if not sched.total_num_scheduled_tokens:
            return out
        scheduled = sched.num_scheduled_tokens
        num_reqs = len(scheduled)
        spec_tokens = sched.scheduled_spec_decode_tokens
        if sched.total_num_scheduled_tokens == num_reqs and not spec_tokens:  # decodes only: the steady state
            states = [self.states[rid] for rid in scheduled]
            counts = np.ones(num_reqs, dtype=np.int64) if self._lora_requests else None
            batch, starts, sampling_reqs = self._build_decode_batch(states)
            ends = None  # starts + 1, made where needed
        else:  # decodes (one query token) first, as the attention metadata promises
            order = sorted(scheduled.items(), key=lambda item: item[1] != 1)
            states = [self.states[rid] for rid, _ in order]
            counts = np.fromiter((n for _, n in order), dtype=np.int64, count=num_reqs)
            starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=num_reqs)
            if spec_tokens:  # drafts to verify: each of a request's tokens becomes a one-token (decode) row
                states, counts, starts = self.spec.as_decode_rows(states, counts, starts, spec_tokens)
                num_reqs = len(states)
            ends = starts + counts
            batch = self._build_batch(states, counts, starts, ends)
            sampling_reqs = None
        extra = {"token_type_ids": batch["token_type_ids"]} if self.uses_token_type_ids else {}
        if self.pipeline is not None:
            extra["intermediate_tensors"] = self.pipeline.receive()
        def forward() -> torch.Tensor:
            return self.model(batch["input_ids"], batch["positions"], self.kv_caches, batch["attn_metadata"], **extra)

        hidden = (self.lora.run_step(forward, [s.lora_request for s in states], counts)
                  if self._lora_requests else forward())
        if self.pipeline is not None and not self.pipeline.is_last:  # hand over; the last stage samples
            self.pipeline.send(hidden)
            return self.pipeline.share_output(out)
        usual = not self._unusual
        if not usual:
            ends = starts + 1 if ends is None else ends
            self._pool(out, hidden, states, ends, batch["query_start_loc"])

        # Rows that sample: every scheduled token of the request is now computed.
        if sampling_reqs is None:
            sampling_reqs = ends == np.fromiter((len(s.token_ids) for s in states), dtype=np.int64, count=num_reqs)
        if spec_tokens:
            sampling_reqs[self.spec.verify(out, hidden, states, batch["query_start_loc"], spec_tokens)] = False
        if sampling_reqs.all() and (usual or all(len(s.sampling) == 1 for s in states)):
            sample_states = [s.sampling[0] for s in states]
            owners, one_each = states, True  # one sample of each request: no fork
            # Decodes only: the hidden states are already the sampling rows, in order.
            rows = None if hidden.shape[0] == num_reqs else batch["query_start_loc"][1:] - 1
        else:
            last_token_index = batch["query_start_loc"][1:] - 1
            one_each = None  # _record_samples finds out
            rows_list: list[int] = []
            sample_states, owners = [], []
            for i in np.flatnonzero(sampling_reqs).tolist():
                state = states[i]
                for sampling in state.sampling:
                    rows_list.append(int(last_token_index[i]))
                    sample_states.append(sampling)
                    owners.append(state)
            rows = np.asarray(rows_list, dtype=np.int64)
        if sample_states:
            sample_hidden = hidden if rows is None else hidden[torch.from_numpy(rows).to(self.device)]
            greedy = None
            grammar = sched.grammar_bitmask  # structured outputs: masks for the constrained rows
            if self.greedy_head and ((usual and not self._not_plain_greedy)
                                     or all(s.is_plain_greedy for s in sample_states)):
                # Only the argmax is needed: the LM head may find it without writing the logits out (over the
                # tokens the grammar allows, for constrained rows).
                allowed = None if grammar is None else grammar.rows_bitmask(owners)
                greedy = (self.model.compute_greedy(sample_hidden) if allowed is None
                          else self.model.compute_greedy(sample_hidden, allowed))
            if greedy is not None:
                self._record_samples(out, greedy.tolist(), None, sample_states, owners, one_each)
            else:
                logits = self.model.compute_logits(sample_hidden)
                if grammar is not None:
                    logits = grammar.apply_to_logits(logits, owners)
                result = self.sampler(logits, sample_states)
                self._record_samples(out, result.sampled_token_ids.tolist(), result.logprobs, sample_states, owners,
                                     one_each)
        if not usual:
            self._prompt_logprobs(out, hidden, states, starts, ends, batch["query_start_loc"])
        if self.spec is not None and out.sampled:
            self.spec.propose(out, self.states)
        return out if self.pipeline is None else self.pipeline.share_output(out)

    def _record_samples(self, out: RunnerOutput, tokens: list[int], logprobs: LogprobsTensors | None,
                        sample_states: list[SamplingRequestState], owners: list[RunnerRequestState],
                        one_each: bool | None = None) -> None:
        """Append the sampled tokens; ``one_each``: whether each owner appears once (no fork), when known."""
        lp_lists = logprobs.tolists() if logprobs is not None else None
        if one_each is None:
            one_each = len(owners) == len({id(s) for s in owners})
        if one_each:  # no fork this step: one sample per request
            sampled = out.sampled
            for token, sampling, state in zip(tokens, sample_states, owners):
                sampled[state.request_id] = [token]
                sampling.output_token_ids.append(token)
                state.token_ids.append(token)
            if lp_lists is not None:
                for row, (sampling, state) in enumerate(zip(sample_states, owners)):
                    if sampling.params.logprobs is not None:
                        out.logprobs[state.request_id] = (lp_lists[0][row], lp_lists[1][row], lp_lists[2][row])
            return
        for row, (token, sampling, state) in enumerate(zip(tokens, sample_states, owners)):
            out.sampled.setdefault(state.request_id, []).append(token)
            sampling.output_token_ids.append(token)
            seq_id = state.request_id
            if len(state.sampling) > 1:
                seq_id = child_request_id(state.request_id, len(out.sampled[state.request_id]) - 1)
            if lp_lists is not None and sampling.params.logprobs is not None:
                out.logprobs[seq_id] = (lp_lists[0][row], lp_lists[1][row], lp_lists[2][row])
        for state in {id(s): s for s in owners}.values():
            if len(state.sampling) > 1:  # forked: each sample becomes a request of its own
                for index, sampling in enumerate(state.sampling):
                    child_id = child_request_id(state.request_id, index)
                    if not sampling.is_plain_greedy:
                        self._not_plain_greedy.add(child_id)
                    self.states[child_id] = RunnerRequestState(
                        child_id, state.token_ids + [sampling.output_token_ids[-1]], state.num_prompt_tokens,
                        sampling.params, list(state.block_ids), state.num_computed_tokens, [sampling],
                        block_row=self.block_rows.add(state.block_ids), lora_request=state.lora_request)
                    if state.lora_request is not None:
                        self._lora_requests.add(child_id)
            else:
                state.token_ids.append(out.sampled[state.request_id][-1])

    def _pool(self, out: RunnerOutput, hidden: torch.Tensor, states: list[RunnerRequestState], ends: np.ndarray,
              query_start_loc: np.ndarray) -> None:
        """Pooling requests (scheduled whole, never chunked) hand their prompt's hidden states to the model's
        pooler."""
        pooling = [i for i, s in enumerate(states) if not s.sampling and ends[i] == len(s.token_ids)]
        if not pooling:
            return
        slices = [hidden[int(query_start_loc[i]):int(query_start_loc[i + 1])] for i in pooling]
        results = self.model.get_pooler()(slices, [states[i].params for i in pooling],
                                    [states[i].token_ids for i in pooling])
        for i, result in zip(pooling, results):
            out.pooled[states[i].request_id] = result.float().cpu()

    def _prompt_logprobs(self, out, hidden, states, starts, ends, query_start_loc) -> None:
        for i, state in enumerate(states):
            num = state.params.prompt_logprobs
            if num is None or not state.sampling or starts[i] >= state.num_prompt_tokens - 1:
                continue
            # Position p predicts prompt token p + 1.
            last = min(int(ends[i]), state.num_prompt_tokens - 1)
            rows = torch.arange(int(query_start_loc[i]), int(query_start_loc[i]) + last - int(starts[i]))
            targets = state.token_ids[int(starts[i]) + 1:last + 1]
            logits = self.model.compute_logits(hidden[rows.to(self.device)])
            k = logits.shape[-1] if num == -1 else num
            ids, lps, ranks = compute_prompt_logprobs(logits, targets, k).tolists()
            out.prompt_logprobs.setdefault(state.request_id, []).extend(zip(ids, lps, ranks))

    def _build_decode_batch(self, states: list[RunnerRequestState]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """The batch of a decode-only step (one token per request, the one at its start); also each request's start
        and which requests sample (all but a prompt's chunk of one token that is not its last). One pass over the
        requests reads all four numbers each contributes."""
        num_reqs = len(states)
        per_request = chain.from_iterable(((start := s.num_computed_tokens), s.token_ids[start],
                                           len(s.token_ids) - start, s.block_row) for s in states)
        starts, input_ids, tokens_left, rows = \
            np.fromiter(per_request, dtype=np.int64, count=4 * num_reqs).reshape(num_reqs, 4).T.copy()
        metadata = decode_batch_metadata(starts, self.block_rows.gather(rows), self.block_size, self.device,
                                         self.causal)
        input_ids_dev, positions_dev = torch.from_numpy(input_ids), torch.from_numpy(starts)
        if metadata.query_start_loc is not metadata.query_start_loc_cpu:  # the device is not the host
            input_ids_dev, positions_dev = input_ids_dev.to(self.device), positions_dev.to(self.device)
        batch = {"input_ids": input_ids_dev, "positions": positions_dev,
                 "attn_metadata": self.attn_builder.build(metadata),
                 "query_start_loc": metadata.query_start_loc_cpu.numpy(), "token_type_ids": None}
        if self.uses_token_type_ids:
            batch["token_type_ids"] = torch.tensor([s.token_type_ids[c] if s.token_type_ids else 0 for s, c in
                                                    zip(states, starts.tolist())], dtype=torch.int64).to(self.device)
        return batch, starts, tokens_left == 1  # a request samples when the step computes its last token

    def _build_batch(self, states: list[RunnerRequestState], counts: np.ndarray, starts: np.ndarray,
                     ends: np.ndarray) -> dict[str, Any]:
        num_reqs = len(states)
        num_tokens = int(counts.sum())
        num_decodes = int(np.count_nonzero(counts == 1))  # decodes come first
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        # A decode's token is the one at its start (its last one, or a draft being verified).
        input_ids = np.empty(num_tokens, dtype=np.int64)
        input_ids[:num_decodes] = np.fromiter((s.token_ids[start] for s, start in zip(states, starts.tolist())),
                                              dtype=np.int64, count=num_decodes)
        for i in range(num_decodes, num_reqs):
            input_ids[query_start_loc[i]:query_start_loc[i + 1]] = states[i].token_ids[starts[i]:ends[i]]
        rows = np.fromiter((s.block_row for s in states), dtype=np.int64, count=num_reqs)
        block_table = self.block_rows.gather(rows)
        token_type_ids = None
        if self.uses_token_type_ids:
            token_type_ids = np.zeros(num_tokens, dtype=np.int64)
            for i, state in enumerate(states):
                if state.token_type_ids:
                    token_type_ids[query_start_loc[i]:query_start_loc[i + 1]] = \
                        state.token_type_ids[starts[i]:ends[i]]
        dev = self.device
        positions, metadata = flat_batch_layout(counts, starts, query_start_loc, block_table, self.block_size, dev,
                                                self.causal)
        return {"input_ids": torch.from_numpy(input_ids).to(dev), "positions": torch.from_numpy(positions).to(dev),
                "attn_metadata": self.attn_builder.build(metadata), "query_start_loc": query_start_loc,
                "token_type_ids": torch.from_numpy(token_type_ids).to(dev) if token_type_ids is not None else None}
