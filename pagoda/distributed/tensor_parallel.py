"""Tensor parallelism at the model level: each rank's share of the attention heads, the combinations the engine
refuses, and the vocabulary-parallel embedding / LM head arithmetic.

Heads are split as vLLM splits them: ``num_attention_heads / tp`` query heads per rank (an error unless it
divides), and ``num_key_value_heads / tp`` KV heads — or, with fewer KV heads than ranks, one KV head per rank,
each replicated on ``tp / num_key_value_heads`` ranks (an error unless one divides the other).

A vocabulary-parallel table holds rows ``[start, start + rows)`` of the vocabulary (:class:`VocabPartition`,
the last rank zero-padded). A lookup embeds the ids the rank holds, zeroes the others and sums over the ranks;
logits are the ranks' slices gathered, padding dropped; a greedy token is each rank's (max, argmax) reduced over
the ranks without gathering the logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pagoda.distributed.parallel_state import ParallelGroup
from pagoda.distributed.partition import VocabPartition


def heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """This rank's (query heads, KV heads) under ``tp_size``-way tensor parallelism."""
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by tensor_parallel_size ({tp_size})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads ({num_kv_heads}) must be divisible by tensor_parallel_size "
                         f"({tp_size}), or tensor_parallel_size by it (KV heads are then replicated)")
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)


def check_tensor_parallel(config: Any) -> None:
    """Refuse, naming both settings, what the engine can't run with ``tensor_parallel_size > 1``."""
    tp = config.parallel.tensor_parallel_size
    if tp == 1:
        return
    model = config.model
    arch = (getattr(model.hf_config, "architectures", None) or ["?"])[0]
    if model.is_encoder_only:
        raise ValueError(f"tensor_parallel_size {tp}: the encoder-only architecture {arch} runs on one rank only; "
                         "use tensor_parallel_size=1")
    if config.lora is not None:
        raise ValueError(f"enable_lora is not supported with tensor_parallel_size {tp}; use one of them")
    if config.draft is not None:
        raise ValueError(f"speculative_config method 'draft_model' is not supported with tensor_parallel_size {tp}; "
                         "use ngram speculation or tensor_parallel_size=1")


_expert_parallel = False


@contextmanager
def building_model(parallel: Any) -> Iterator[None]:
    """While a model is built: the parallel settings layers read beyond the groups (``enable_expert_parallel``)."""
    global _expert_parallel
    saved, _expert_parallel = _expert_parallel, bool(getattr(parallel, "enable_expert_parallel", False))
    try:
        yield
    finally:
        _expert_parallel = saved


def expert_parallel_enabled() -> bool:
    """Whether mixture-of-experts layers being built hold whole experts per rank (``enable_expert_parallel``)
    rather than a slice of every expert."""
    return _expert_parallel


# ---------------------------------------------------------------------- vocabulary-parallel tables
def masked_embed(embed: Any, part: VocabPartition, group: ParallelGroup, token_ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``token_ids`` from a table split by ``part``: ``embed(local ids)`` on this rank's rows, zero for
    the ids another rank holds, summed over the ranks."""
    local = token_ids - part.start
    outside = (local < 0) | (local >= part.num_real_rows)
    rows = embed(local.masked_fill(outside, 0))
    rows = rows.masked_fill(outside.unsqueeze(-1), 0)
    return group.all_reduce(rows)


def gathered_logits(local_logits: torch.Tensor, part: VocabPartition, group: ParallelGroup) -> torch.Tensor:
    """Every rank's logits ``[n, rows]`` side by side, the padding rows dropped: ``[n, vocab_size]``."""
    return group.all_gather(local_logits, dim=-1)[:, :part.vocab_size]


def allowed_slice(allowed: torch.Tensor, part: VocabPartition) -> torch.Tensor:
    """This rank's tokens of a bitmask over the whole vocabulary (int32 ``[n, ceil(vocab / 32)]``, bit ``t % 32``
    of word ``t // 32`` set: token ``t`` allowed), as booleans ``[n, rows]`` (padding rows disallowed)."""
    first, last = part.start // 32, -(-(part.start + part.num_real_rows) // 32)
    words = allowed[:, first:last]
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=words.dtype, device=words.device)) & 1
    flags = bits.reshape(words.shape[0], -1).bool()
    offset = part.start - first * 32
    flags = flags[:, offset:offset + part.num_real_rows]
    if flags.shape[1] < part.rows:
        flags = torch.nn.functional.pad(flags, (0, part.rows - flags.shape[1]), value=False)
    return flags


def reduced_argmax(local_logits: torch.Tensor, part: VocabPartition, group: ParallelGroup,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax over the whole vocabulary (int64 ``[n]``) of logits split by ``part``: each rank's best
    (value, token) among its real (and allowed) rows, then the best over the ranks — ties to the lowest token id,
    as ``argmax`` breaks them, since lower ranks hold lower ids."""
    logits = local_logits.float()
    if part.num_real_rows < part.rows:
        logits[:, part.num_real_rows:] = float("-inf")
    if allowed is not None:
        logits = logits.masked_fill(~allowed_slice(allowed, part), float("-inf"))
    values, index = logits.max(dim=-1)
    values = group.all_gather(values.unsqueeze(-1), dim=-1)  # [n, ranks]
    tokens = group.all_gather((index + part.start).unsqueeze(-1), dim=-1)
    best_rank = values.argmax(dim=-1, keepdim=True)  # the first (lowest) rank among equal maxima
    return tokens.gather(-1, best_rank).squeeze(-1)
