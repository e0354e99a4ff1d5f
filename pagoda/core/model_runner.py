"""Runs one scheduled step: builds the flat batch, runs the model, samples.

The runner keeps a persistent state per request (its tokens, blocks and sampling state) and receives only what
changed each step. Inputs are built with array operations over the whole batch — no per-token Python work —
and logits are computed only for rows that sample (plus prompt positions where prompt logprobs were asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagoda.attention_backends.interface import CommonAttentionMetadata
from pagoda.core.config import EngineConfig
from pagoda.core.request import child_request_id, sample_params
from pagoda.core.sampler import (LogprobsTensors, Sampler, SamplingRequestState, compute_prompt_logprobs,
                                 make_generator)
from pagoda.core.scheduler import NewRequestData, SchedulerOutput
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


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Any, num_blocks: int, eos_token_ids: set[int],
                 bad_words_encoder: Any = None) -> None:
        self.config = config
        self.model = model
        self.device = config.platform.device()
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        self.bad_words_encoder = bad_words_encoder
        mc = config.model
        self.causal = not mc.is_encoder_only
        self.kv_caches: list[torch.Tensor | None]
        if mc.is_encoder_only:  # encoders attend within the step's tokens only: no cache at all
            self.kv_caches = [None] * mc.num_layers
        else:
            shape = config.attention_backend.kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads,
                                                            mc.head_size)
            # Uninitialized: blocks are zeroed on first use (SchedulerOutput.blocks_to_zero), not all up front.
            self.kv_caches = [torch.empty(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]
            for cache in self.kv_caches:
                cache[:, 0] = 0  # block tables are padded with block 0
        self.uses_token_type_ids = bool(getattr(model, "uses_token_type_ids", False))
        self.attn_builder = config.attention_backend.builder_cls()(config.attention, self.device)
        self.sampler = Sampler()
        self.states: dict[str, RunnerRequestState] = {}

    @staticmethod
    def kv_bytes_per_block(config: EngineConfig) -> int:
        mc = config.model
        if mc.is_encoder_only:
            return 0
        per_token = 2 * mc.num_kv_heads * mc.head_size * torch.empty(0, dtype=mc.dtype).element_size()
        return per_token * config.cache.block_size * mc.num_layers

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
            state.block_ids = list(new.block_ids)
            state.num_computed_tokens = new.num_computed_tokens
            return
        if isinstance(new.params, PoolingParams):
            sampling = []
        elif new.num_samples > 1:
            sampling = [self._sampling_state(sample_params(new.params, index), prompt, outputs)
                        for index in range(new.num_samples)]
        else:
            sampling = [self._sampling_state(new.params, prompt, outputs)]
        self.states[new.request_id] = RunnerRequestState(new.request_id, list(new.token_ids), new.num_prompt_tokens,
                                                         new.params, list(new.block_ids), new.num_computed_tokens,
                                                         sampling, new.token_type_ids)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self._add_request(new)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.block_ids is not None:
                state.block_ids = list(cached.block_ids)
        if sched.blocks_to_zero and self.causal:
            fresh = torch.tensor(sched.blocks_to_zero, device=self.device)
            for cache in self.kv_caches:
                cache[:, fresh] = 0
        if sched.block_copies and self.causal:
            src = torch.tensor([s for s, _ in sched.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in sched.block_copies], device=self.device)
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        out = RunnerOutput()
        if not sched.total_num_scheduled_tokens:
            return out
        # Decodes (one query token) first, as the attention metadata promises.
        order = sorted(sched.num_scheduled_tokens.items(), key=lambda item: item[1] != 1)
        states = [self.states[rid] for rid, _ in order]
        counts = np.fromiter((n for _, n in order), dtype=np.int64, count=len(order))
        starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=len(order))
        ends = starts + counts
        batch = self._build_batch(states, counts, starts, ends)
        extra = {"token_type_ids": batch["token_type_ids"]} if self.uses_token_type_ids else {}
        hidden = self.model(batch["input_ids"], batch["positions"], self.kv_caches, batch["attn_metadata"], **extra)
        self._pool(out, hidden, states, ends, batch["query_start_loc"])

        # Rows that sample: every scheduled token of the request is now computed.
        sample_rows, sample_states, owners = [], [], []
        last_token_index = batch["query_start_loc"][1:] - 1
        for i, state in enumerate(states):
            if ends[i] == len(state.token_ids):
                for sampling in state.sampling:
                    sample_rows.append(int(last_token_index[i]))
                    sample_states.append(sampling)
                    owners.append(state)
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            result = self.sampler(logits, sample_states)
            self._record_samples(out, result.sampled_token_ids.tolist(), result.logprobs, sample_states, owners)
        self._prompt_logprobs(out, hidden, states, starts, ends, batch["query_start_loc"])
        return out

    def _record_samples(self, out: RunnerOutput, tokens: list[int], logprobs: LogprobsTensors | None,
                        sample_states: list[SamplingRequestState], owners: list[RunnerRequestState]) -> None:
        lp_lists = logprobs.tolists() if logprobs is not None else None
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
                    self.states[child_id] = RunnerRequestState(
                        child_id, state.token_ids + [sampling.output_token_ids[-1]], state.num_prompt_tokens,
                        sampling.params, list(state.block_ids), state.num_computed_tokens, [sampling])
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
        results = self.model.pooler(slices, [states[i].params for i in pooling],
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

    def _build_batch(self, states: list[RunnerRequestState], counts: np.ndarray, starts: np.ndarray,
                     ends: np.ndarray) -> dict[str, Any]:
        num_reqs = len(states)
        num_tokens = int(counts.sum())
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        input_ids = np.empty(num_tokens, dtype=np.int64)
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        token_type_ids = np.zeros(num_tokens, dtype=np.int64) if self.uses_token_type_ids else None
        for i, state in enumerate(states):
            input_ids[query_start_loc[i]:query_start_loc[i + 1]] = state.token_ids[starts[i]:ends[i]]
            block_table[i, :len(state.block_ids)] = state.block_ids
            if token_type_ids is not None and state.token_type_ids:
                token_type_ids[query_start_loc[i]:query_start_loc[i + 1]] = state.token_type_ids[starts[i]:ends[i]]
        # Per-token request index and position, without a Python loop over tokens.
        req_index = np.repeat(np.arange(num_reqs), counts)
        positions = np.arange(num_tokens) - np.repeat(query_start_loc[:-1], counts) + np.repeat(starts, counts)
        bs = self.block_size
        slot_mapping = block_table[req_index, positions // bs].astype(np.int64) * bs + positions % bs
        num_decodes = int(np.count_nonzero(counts == 1))
        dev = self.device
        qsl_cpu = torch.from_numpy(query_start_loc)
        seq_lens_cpu = torch.from_numpy(ends.astype(np.int32))
        metadata = CommonAttentionMetadata(
            num_reqs=num_reqs, num_tokens=num_tokens, num_decodes=num_decodes, num_decode_tokens=num_decodes,
            max_query_len=int(counts.max()), max_seq_len=int(ends.max()),
            query_start_loc=qsl_cpu.to(dev), query_start_loc_cpu=qsl_cpu,
            seq_lens=seq_lens_cpu.to(dev), seq_lens_cpu=seq_lens_cpu,
            num_computed_tokens_cpu=torch.from_numpy(starts.astype(np.int32)),
            block_table=torch.from_numpy(block_table).to(dev), slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            causal=self.causal,
        )
        return {
            "input_ids": torch.from_numpy(input_ids).to(dev),
            "positions": torch.from_numpy(positions).to(dev),
            "attn_metadata": self.attn_builder.build(metadata),
            "query_start_loc": query_start_loc,
            "token_type_ids": torch.from_numpy(token_type_ids).to(dev) if token_type_ids is not None else None,
        }
