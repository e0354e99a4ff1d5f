"""A request as the scheduler sees it: its tokens, how many are in the KV cache, and its status."""

from __future__ import annotations

import enum
import time
from pagoda.core.block_pool import hash_block_tokens, root_hash
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_FSM = "waiting_for_fsm"  # held by the engine until its structured-output grammar is compiled
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


def child_request_id(parent_id: str, index: int) -> str:
    """Id of sample ``index`` of a request with ``n > 1`` (samples are scheduled as requests of their own)."""
    return f"{index}_{parent_id}"


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling parameters of sample ``index`` of a forked request: one sample each, and a seed of its own
    (distinct, still reproducible) when the request is seeded. The scheduler and the runner both use this, so
    the forked requests and the generators that sample their first tokens agree."""
    params = params.clone()
    params.n, params.best_of = 1, None
    if params.seed is not None:
        params.seed += index
    return params


class Request:
    """One sequence being generated. A prompt with ``n > 1`` starts as one request (the prompt is computed once)
    and forks into ``n`` child requests sharing its KV blocks once the first tokens are sampled."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                 arrival_time: float | None = None, eos_token_ids: set[int] | None = None,
                 parent_id: str | None = None, index: int = 0, token_type_ids: list[int] | None = None,
                 cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.eos_token_ids = eos_token_ids or set()
        self.parent_id = parent_id  # the user's request id for forked samples
        self.index = index  # which of the n samples
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling (-1: not yet scheduled)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.cache_salt = cache_salt  # requests share cached blocks only with requests of the same salt
        self.block_hashes: list[bytes] = []
        self.num_hashed_blocks = 0  # leading blocks of this request already entered into the prefix cache
        self.num_preemptions = 0
        self.spec_token_ids: list[int] = []  # draft tokens to verify next step (speculative decoding)
        self.token_type_ids = token_type_ids  # segment ids of sentence pairs (BERT-style cross-encoders)
        self.beam_group = None  # the BeamGroup this request is a beam of (beam search), else None
        self.lora_request = None  # its LoRA adapter (a LoRARequest); its KV is shared only with the same adapter

    @property
    def is_pooling(self) -> bool:
        """Pooling requests run their whole prompt in one step and produce no tokens."""
        return isinstance(self.params, PoolingParams)

    @property
    def needs_all_prompt_states(self) -> bool:
        """Prompt logprobs and pooling need every prompt position computed, so they skip the prefix cache."""
        return self.is_pooling or self.params.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_samples(self) -> int:
        """Samples still to fork into (``best_of`` or ``n``); 1 once forked or for plain requests."""
        if self.parent_id is not None:
            return 1
        return max(self.params.n, self.params.best_of or 1)

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def update_block_hashes(self, block_size: int) -> list[bytes]:
        """Extend the prefix hash chain over every block whose tokens are all known."""
        hashes = self.block_hashes
        tokens = self.all_token_ids
        for i in range(len(hashes), len(tokens) // block_size):
            parent = hashes[-1] if hashes else root_hash(self.cache_salt, self.lora_request)
            hashes.append(hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size]))
        return hashes
