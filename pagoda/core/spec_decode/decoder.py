"""The model runner's side of speculative decoding: verify the scheduled drafts, record what was accepted,
and propose the next drafts.

A request with drafts is scheduled as its last token plus the drafts; the runner appends the drafts to the
request's tokens for the step (so the batch is built as for any multi-token chunk, and the target computes all
``d + 1`` positions through the paged cache in the one forward pass), and :meth:`SpecDecoder.verify` then takes
logits only at those rows, accepts the longest prefix (see ``rejection_sampler``), removes the drafts again and
appends the accepted tokens plus the corrected or bonus token — cut after the first one that stops the request
(EOS, a stop token, ``max_tokens``, the context length), since output after a stop is discarded.

Requests that get no drafts (documented in ``docs/speculative_decoding.md``): requests asking for ``logprobs``
(one logprob entry per step today), requests about to fork into ``n``/``best_of`` samples, and requests with
structured outputs (their grammar must see each token before the next one is chosen). They decode as usual in
the same batches.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from pagoda.core.request import child_request_id
from pagoda.core.spec_decode.config import SpeculativeConfig
from pagoda.core.spec_decode.metrics import SpecDecodingStats
from pagoda.core.spec_decode.rejection_sampler import greedy_accept, rejection_sample
from pagoda.logger import init_logger

logger = init_logger(__name__)


def make_proposer(config: Any, runner: Any) -> Any:
    spec: SpeculativeConfig = config.speculative_config
    if spec.method == "ngram":
        from pagoda.core.spec_decode.ngram import NgramProposer

        return NgramProposer(spec)
    from pagoda.core.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(config, runner)


def _row_states(sampling: Any, drafts: list[int]) -> list[Any]:
    """The sampling state of each of the ``d + 1`` rows: row ``j`` has ``drafts[:j]`` as extra outputs, which
    penalties, bad words and min_tokens must see. Requests using none of those share one state."""
    if not (sampling.has_penalties or sampling.needs_masking):
        return [sampling] * (len(drafts) + 1)
    rows = [sampling]
    for j in range(1, len(drafts) + 1):
        row = copy.copy(sampling)
        row.output_token_ids = sampling.output_token_ids + drafts[:j]
        row._output_buffer, row._num_buffered = torch.empty(0, dtype=torch.int64), 0
        rows.append(row)
    return rows


def truncate_at_stop(tokens: list[int], sampling: Any, num_prompt_tokens: int, max_model_len: int) -> list[int]:
    """``tokens`` up to and including the first one that ends the request (checked in ``check_stop``'s order)."""
    params = sampling.params
    num_output = len(sampling.output_token_ids)
    limit = min(params.max_tokens if params.max_tokens is not None else 1 << 62, max_model_len - num_prompt_tokens)
    for j, token in enumerate(tokens):
        count = num_output + j + 1
        if count >= limit:
            return tokens[:j + 1]
        if count >= params.min_tokens and (token in sampling.eos_token_ids or token in params.stop_token_ids):
            return tokens[:j + 1]
    return tokens


class SpecDecoder:
    def __init__(self, config: Any, runner: Any) -> None:
        self.spec: SpeculativeConfig = config.speculative_config
        self.max_model_len = config.model.max_model_len
        self.runner = runner
        self.proposer = make_proposer(config, runner)
        self.stats = SpecDecodingStats(self.spec.num_speculative_tokens)
        self._eligible: dict[str, bool] = {}

    def reset_stats(self) -> None:
        self.stats = SpecDecodingStats(self.spec.num_speculative_tokens)

    # ------------------------------------------------------------------ requests
    def add_request(self, state: Any) -> None:
        """A new or rebuilt (preempted) request."""
        self._eligible.pop(state.request_id, None)
        self.proposer.add_request(state)

    def remove_request(self, request_id: str) -> None:
        self._eligible.pop(request_id, None)
        self.proposer.remove_request(request_id)

    def _is_eligible(self, state: Any) -> bool:
        eligible = self._eligible.get(state.request_id)
        if eligible is None:
            params = state.params
            eligible = (len(state.sampling) == 1 and params.logprobs is None
                        and getattr(params, "structured_outputs", None) is None)
            self._eligible[state.request_id] = eligible
        return eligible

    # ------------------------------------------------------------------ the step
    @staticmethod
    def as_decode_rows(states: list[Any], counts: np.ndarray, starts: np.ndarray,
                       spec_tokens: dict[str, list[int]]) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """The batch with each verified request's ``d + 1`` tokens as ``d + 1`` one-token rows (same block
        table, consecutive positions), among the decodes; its drafts are appended to its tokens until
        :meth:`verify` replaces them with the accepted ones. Attention writes a step's KV before it attends, so
        row j reads the rows before it from the cache: exactly causal attention over the request. The step
        then runs as a decode step — the paged decode kernels, the platform's fused decode step — instead of
        the prefill path, and each row costs what a decode costs."""
        decode_states, decode_starts, rest = [], [], []
        for state, count, start in zip(states, counts.tolist(), starts.tolist()):
            if state.request_id in spec_tokens:
                state.token_ids.extend(spec_tokens[state.request_id])
                decode_states.extend([state] * count)
                decode_starts.extend(range(start, start + count))
            elif count == 1:
                decode_states.append(state)
                decode_starts.append(start)
            else:
                rest.append((state, count, start))
        num = len(decode_states)
        all_states = decode_states + [r[0] for r in rest]
        new_counts = np.ones(len(all_states), dtype=np.int64)
        new_counts[num:] = [r[1] for r in rest]
        new_starts = np.asarray(decode_starts + [r[2] for r in rest], dtype=np.int64)
        return all_states, new_counts, new_starts

    def verify(self, out: Any, hidden: torch.Tensor, states: list[Any], query_start_loc: np.ndarray,
               spec_tokens: dict[str, list[int]]) -> np.ndarray:
        """Verify the drafts of every request in ``spec_tokens``; returns the indices (into ``states``) handled.
        A verified request's rows are consecutive in the batch: its last token's, then its drafts'."""
        runner = self.runner
        index = np.asarray([i for i, s in enumerate(states) if s.request_id in spec_tokens], dtype=np.int64)
        starts = query_start_loc[index].astype(np.int64)
        counts = query_start_loc[index + 1] - starts
        rows = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
        verified = [runner.states[rid] for rid in dict.fromkeys(states[i].request_id for i in index)]
        drafts = [spec_tokens[s.request_id] for s in verified]
        # d + 1 rows each: the last token's and the drafts'
        offsets = np.concatenate(([0], np.cumsum([len(d) + 1 for d in drafts])))
        row_hidden = hidden[torch.from_numpy(rows).to(hidden.device)]
        samplings = [s.sampling[0] for s in verified]
        random_results: dict[int, tuple[int, int]] = {}  # sampling requests: (accepted drafts, next token)
        targets = None
        if runner.greedy_head and all(s.is_plain_greedy for s in samplings):
            greedy = runner.model.compute_greedy(row_hidden)  # the argmax without writing logits out
            targets = greedy.tolist() if greedy is not None else None
        if targets is None:
            logits = runner.model.compute_logits(row_hidden).float()
            row_states = [row for sampling, d in zip(samplings, drafts) for row in _row_states(sampling, d)]
            logits = runner.sampler.process_logits(logits, row_states)
            targets = logits.argmax(dim=-1).tolist()
            random = [i for i, s in enumerate(samplings) if not s.is_greedy]
            if random:
                random_rows = torch.from_numpy(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in random]))
                shaped = runner.sampler.shape_random_logits(logits[random_rows],
                                                            [row_states[int(r)] for r in random_rows])
                probs = torch.softmax(shaped, dim=-1)
                base = 0
                for i in random:
                    d = len(drafts[i])
                    q = self.proposer.draft_probs(verified[i].request_id)
                    random_results[i] = rejection_sample(probs[base:base + d + 1],
                                                         torch.tensor(drafts[i], dtype=torch.int64),
                                                         None if q is None else q[:d], samplings[i].generator)
                    base += d + 1
        for i, (state, sampling, d) in enumerate(zip(verified, samplings, drafts)):
            if sampling.is_greedy:
                row_targets = targets[offsets[i]:offsets[i + 1]]
                accepted = greedy_accept(row_targets, d)
                next_token = row_targets[accepted]
            else:
                accepted, next_token = random_results[i]
            self.stats.observe(len(d), accepted)
            tokens = truncate_at_stop(d[:accepted] + [next_token], sampling, state.num_prompt_tokens,
                                      self.max_model_len)
            del state.token_ids[len(state.token_ids) - len(d):]
            state.token_ids.extend(tokens)
            sampling.output_token_ids.extend(tokens)
            out.sampled[state.request_id] = tokens
        return index

    def propose(self, out: Any, states: dict[str, Any]) -> None:
        """Drafts for the requests that sampled this step, into ``out.spec_token_ids``."""
        candidates = []
        for rid, tokens in out.sampled.items():
            state = states.get(rid)
            if state is not None and len(state.sampling) > 1:  # forked this step: its samples draft
                children = (states[child_request_id(rid, i)] for i in range(len(tokens)))
                candidates.extend(child for child in children if self._is_eligible(child))
            elif state is not None and self._is_eligible(state):
                candidates.append(state)
        if candidates:
            rows = np.fromiter((s.block_row for s in candidates), dtype=np.int64, count=len(candidates))
            block_rows = self.runner.block_rows
            out.spec_token_ids = self.proposer.propose(candidates, block_rows.gather(rows), block_rows.lengths[rows])
