"""Draft-model proposer (vLLM's ``draft_model`` method): a small model with the target's vocabulary proposes
k tokens autoregressively, batched over the requests.

The draft has its own KV cache — one tensor per draft layer, with as many blocks as the target's — addressed
through the target's block tables and slot mapping: position p of a request lives in the same block and slot in
both caches, so the scheduler's block bookkeeping (allocation, prefix hits, freeing) covers the draft too, and
the scheduler reserves k lookahead slots past each request's tokens for the draft's proposals.

Per request the proposer remembers which tokens have their draft KV written (``_computed``): those up to its
last proposal, and the proposals it fed back then, which hold where the target accepted them. After a step it
catches up on the tokens since — usually the bonus token, or a whole prompt — in one pass, whose last row gives
the first draft; k - 1 single-token passes give the rest. A short catch-up runs as one-token rows of its request,
so every pass of the usual step is a decode step. Proposals write KV only past the request's real tokens, so a
rejected draft's KV is simply overwritten when the catch-up reaches that position: the draft cache stays
consistent with the accepted tokens after every rollback. After a preemption (blocks freed) or on a prefix-cache
hit (blocks whose draft KV another request wrote, or never wrote) the request is caught up from position 0. The
draft's KV only affects how good its proposals are: every emitted token is the target's.

Greedy requests get the draft's argmax; sampling requests a draw from the draft's distribution after the same
temperature / min-p / top-k / top-p (with the request's generator), kept as ``q`` for rejection sampling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagoda.core.flat_batch import flat_batch_layout
from pagoda.core.model_loader import load_model
from pagoda.core.sampler import Sampler
from pagoda.core.spec_decode.rejection_sampler import sample_from
from pagoda.ops import current_ops, use_ops


def draft_kv_bytes_per_block(config: Any) -> int:
    """KV bytes per block of the draft model (0 without one), for the engine's cache budget."""
    draft = getattr(config, "draft", None)
    if draft is None:
        return 0
    mc = draft.model
    per_token = 2 * mc.num_kv_heads * mc.head_size * torch.empty(0, dtype=mc.dtype).element_size()
    return per_token * config.cache.block_size * mc.num_layers


class DraftModelProposer:
    def __init__(self, config: Any, runner: Any) -> None:
        draft = config.draft
        self.k = config.speculative_config.num_speculative_tokens
        self.device = runner.device
        self.block_size = runner.block_size
        self.max_model_len = config.model.max_model_len
        self.model = load_model(draft)
        mc = draft.model
        shape = draft.attention_backend.kv_cache_shape(config.cache.num_blocks, self.block_size, mc.num_kv_heads,
                                                       mc.head_size)
        # Zeroed up front (the target zeroes its blocks on first use): padding positions must hold no NaN.
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]
        with use_ops(draft.ops or current_ops()):
            self.attn_builder = draft.attention_backend.builder_cls()(draft.attention, self.device)
        stack = self.model.decoder_stack()
        # The k - 1 single-token passes are decode steps: the platform may fuse them as it does the target's.
        self.model.use_fused_decode(draft.platform.fused_decode(stack, draft.ops, self.kv_caches)
                                    if stack is not None and draft.ops is not None else None)
        # request id → (tokens when it last proposed, the drafts fed back then): what its draft KV holds
        self._computed: dict[str, tuple[int, list[int]]] = {}
        self._probs: dict[str, torch.Tensor] = {}  # request id → q of its last drafts (sampling requests)

    def add_request(self, state: Any) -> None:
        self._computed.pop(state.request_id, None)  # new, or rebuilt after preemption: catch up from 0

    def remove_request(self, request_id: str) -> None:
        self._computed.pop(request_id, None)
        self._probs.pop(request_id, None)

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        return self._probs.get(request_id)

    # ------------------------------------------------------------------ proposing
    @torch.inference_mode()
    def propose(self, states: list[Any], block_table: np.ndarray, num_blocks: np.ndarray) -> dict[str, list[int]]:
        ends = np.fromiter((len(s.token_ids) for s in states), dtype=np.int64, count=len(states))
        # Proposals must stay within the context, the request's max_tokens and the blocks it was given.
        room = np.fromiter((self._room(s) for s in states), dtype=np.int64, count=len(states))
        capacity = num_blocks * self.block_size
        num_drafts = np.minimum(np.minimum(room, self.k), capacity - ends + 1)
        keep = np.flatnonzero(num_drafts > 0)
        if keep.size == 0:
            return {}
        states = [states[i] for i in keep]
        ends, num_drafts, table = ends[keep], num_drafts[keep], block_table[keep]
        starts = np.fromiter((self._valid_prefix(s) for s in states), dtype=np.int64, count=len(states))
        samplings = [s.sampling[0] for s in states]
        counts = ends - starts
        if counts.max() <= self.k + 1:
            # A few tokens each (the usual catch-up after a verification): one-token rows of their requests, so the
            # pass runs as a decode step (attention writes a step's KV before it attends: causal within the rows).
            order = np.arange(len(states))
            tokens = np.concatenate([states[i].token_ids[starts[i]:ends[i]] for i in order])
            positions = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) \
                + np.repeat(starts, counts)
            hidden_rows = self._forward(tokens, np.ones(tokens.shape[0], dtype=np.int64), positions,
                                        np.repeat(table, counts, axis=0))[np.cumsum(counts) - 1]
        else:  # whole prompts: decodes (one new token) first, as the attention metadata promises
            order = np.argsort(counts != 1, kind="stable")
            tokens = np.concatenate([states[i].token_ids[starts[i]:ends[i]] for i in order])
            hidden_rows = self._forward(tokens, counts[order], starts[order], table[order])
        drafts = np.zeros((len(states), int(num_drafts.max())), dtype=np.int64)
        probs: dict[int, list[torch.Tensor]] = {}
        drafts[order, 0] = self._sample(hidden_rows, [samplings[i] for i in order], order, probs)
        for j in range(1, drafts.shape[1]):
            active = np.flatnonzero(num_drafts > j)
            positions = ends[active] + j - 1  # the previous draft's position
            hidden_rows = self._forward(drafts[active, j - 1], np.ones(active.size, dtype=np.int64), positions,
                                        table[active])
            drafts[active, j] = self._sample(hidden_rows, [samplings[i] for i in active], active, probs)
        proposals = {}
        for i, state in enumerate(states):
            proposals[state.request_id] = drafts[i, :num_drafts[i]].tolist()
            # Positions ends .. ends + n - 2 now hold the KV of the first n - 1 drafts: valid where accepted.
            self._computed[state.request_id] = (int(ends[i]), proposals[state.request_id][:-1])
            if i in probs:
                self._probs[state.request_id] = torch.stack(probs[i])
        return proposals

    def _valid_prefix(self, state: Any) -> int:
        """Leading tokens of the request whose draft KV is written and right: those up to the last proposal,
        plus the proposals fed back since that were accepted; at most all but the last token (its row gives the
        first draft)."""
        end, fed = self._computed.get(state.request_id, (0, []))
        tokens = state.token_ids
        valid = min(end, len(tokens))
        for draft in fed:
            if valid >= len(tokens) or tokens[valid] != draft:
                break
            valid += 1
        return min(valid, len(tokens) - 1)

    def _room(self, state: Any) -> int:
        """Drafts worth proposing: tokens the request may still produce, less the one every step yields."""
        params = state.params
        left = self.max_model_len - len(state.token_ids)
        if params.max_tokens is not None:
            left = min(left, params.max_tokens - (len(state.token_ids) - state.num_prompt_tokens))
        return left - 1

    def _sample(self, hidden: torch.Tensor, samplings: list[Any], index: np.ndarray,
                probs: dict[int, list[torch.Tensor]]) -> np.ndarray:
        """The next draft of each row: the argmax for greedy requests, a draw from q for sampling ones (q kept)."""
        logits = self.model.compute_logits(hidden).float()
        tokens = logits.argmax(dim=-1)
        random = [r for r, s in enumerate(samplings) if not s.is_greedy]
        if random:
            rows = torch.tensor(random)
            q = torch.softmax(Sampler.shape_random_logits(logits[rows], [samplings[r] for r in random]), dim=-1)
            for row, r in enumerate(random):
                uniform = torch.rand(1, generator=samplings[r].generator, device=q.device)[0]
                tokens[r] = sample_from(q[row], uniform)
                probs.setdefault(int(index[r]), []).append(q[row])
        return tokens.cpu().numpy()

    def _forward(self, input_ids: np.ndarray, counts: np.ndarray, starts: np.ndarray,
                 block_table: np.ndarray) -> torch.Tensor:
        """Run the draft on ``counts[i]`` tokens of request i from position ``starts[i]`` (one-token requests
        first); returns the hidden state of each request's last token."""
        num_reqs = counts.shape[0]
        num_tokens = int(counts.sum())
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        dev = self.device
        positions, metadata = flat_batch_layout(counts, starts, query_start_loc, block_table, self.block_size, dev)
        hidden = self.model(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(dev),
                            torch.from_numpy(positions).to(dev), self.kv_caches, self.attn_builder.build(metadata))
        if num_tokens == num_reqs:
            return hidden
        return hidden[torch.from_numpy(query_start_loc[1:] - 1).to(dev)]
