"""A worker: one rank of an engine — its device, its shard of the model, its KV cache and its model runner.

Every executor runs the same worker: in the engine's own process (``uni``, ``external_launcher``), in worker
processes (``mp``) or in Ray actors (``ray``). The executor calls, in order, :meth:`init_device`,
:meth:`load_model`, :meth:`available_kv_blocks` (the engine takes the smallest over the ranks),
:meth:`initialize_cache`, then :meth:`execute_model` once per engine step.
"""

from __future__ import annotations

from typing import Any

from pagoda.core.config import EngineConfig
from pagoda.core.model_loader import load_model, model_bytes
from pagoda.core.model_runner import ModelRunner, RunnerOutput
from pagoda.core.sampler import bad_words_to_token_ids
from pagoda.core.scheduler import SchedulerOutput
from pagoda.distributed import init_distributed_environment, initialize_model_parallel
from pagoda.lora.manager import lora_device_bytes
from pagoda.ops import current_ops
from pagoda.utils import cdiv


def num_kv_blocks(config: EngineConfig, weight_bytes: int) -> int:
    """KV-cache blocks this rank can hold beside ``weight_bytes`` of weights and adapter slots (never more than
    every sequence at full length could use)."""
    cache, model = config.cache, config.model
    if cache.num_blocks_override is not None:
        return cache.num_blocks_override
    needed = config.scheduler.max_num_seqs * cdiv(model.max_model_len, cache.block_size)
    per_block = ModelRunner.kv_bytes_per_block(config)
    if per_block == 0:  # encoder-only: blocks are bookkeeping only, no memory behind them
        return needed
    budget = cache.kv_cache_memory_bytes or config.platform.kv_cache_budget_bytes(
        gpu_memory_utilization=cache.gpu_memory_utilization, cpu_kvcache_space_gib=cache.cpu_kvcache_space_gib,
        model_bytes=weight_bytes)
    blocks = min(budget // per_block, needed)
    if blocks < 1:
        raise ValueError(f"the KV-cache budget ({budget} bytes) holds no block of {per_block} bytes; raise "
                         "kv_cache_memory_bytes / VLLM_CPU_KVCACHE_SPACE or gpu_memory_utilization")
    return int(blocks)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None, tokenizer: Any = None) -> None:
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.distributed_init_method = distributed_init_method
        self.tokenizer = tokenizer  # for bad_words; loaded on first need in worker processes
        self.model: Any = None
        self.runner: ModelRunner | None = None

    def init_device(self) -> None:
        platform, parallel = self.config.platform, self.config.parallel
        platform.set_device(self.local_rank)
        if parallel.world_size > 1 or parallel.distributed_executor_backend == "external_launcher":
            init_distributed_environment(parallel.world_size, self.rank, self.distributed_init_method or "env://",
                                         platform.dist_backend)
            initialize_model_parallel(parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                      platform.dist_backend)
        platform.seed_everything(self.config.seed)

    def load_model(self) -> None:
        self.model = load_model(self.config)

    def available_kv_blocks(self) -> int:
        ops = self.config.ops or current_ops()
        return num_kv_blocks(self.config, model_bytes(self.model) + lora_device_bytes(self.config, self.model, ops))

    def initialize_cache(self, num_blocks: int, eos_token_ids: set[int]) -> None:
        self.config.cache.num_blocks = num_blocks
        encoder = None if self.config.model.skip_tokenizer_init else self._encode_bad_words
        self.runner = ModelRunner(self.config, self.model, num_blocks, eos_token_ids, encoder)

    def _encode_bad_words(self, words: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            from pagoda.core.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.config.model)
        return bad_words_to_token_ids(self.tokenizer, words)

    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)
