"""The load figures of data-parallel replicas: summed for the server's metrics, and kept per replica."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pagoda.core.engine import EngineStats


@dataclass
class ReplicaStats:
    """One replica's load, as ``/metrics`` shows it per replica."""

    index: int
    num_running: int
    num_waiting: int
    num_unfinished: int  # requests routed to it and not yet finished (client count)
    requests_total: int  # requests ever routed to it


@dataclass
class DPEngineStats(EngineStats):
    """The replicas' ``EngineStats`` summed, and each replica's load."""

    replicas: list[ReplicaStats] = field(default_factory=list)


def sum_replica_stats(stats: list[EngineStats], loads: list[ReplicaStats]) -> DPEngineStats:
    """The replicas' ``EngineStats`` summed (KV usage over all their blocks), with each replica's load."""
    total_blocks = sum(s.num_total_blocks for s in stats)
    return DPEngineStats(
        num_running=sum(s.num_running for s in stats), num_waiting=sum(s.num_waiting for s in stats),
        kv_cache_usage=sum(s.kv_cache_usage * s.num_total_blocks for s in stats) / max(total_blocks, 1),
        num_free_blocks=sum(s.num_free_blocks for s in stats), num_total_blocks=total_blocks,
        prompt_tokens_total=sum(s.prompt_tokens_total for s in stats),
        generation_tokens_total=sum(s.generation_tokens_total for s in stats),
        num_preemptions_total=sum(s.num_preemptions_total for s in stats),
        spec_decoding=_sum_spec_stats([s.spec_decoding for s in stats]), replicas=loads)


def _sum_spec_stats(snapshots: list[Any]) -> Any:
    present = [s for s in snapshots if s is not None]
    if not present:
        return None
    total = dataclasses.replace(present[0], num_accepted_tokens_per_pos=list(present[0].num_accepted_tokens_per_pos))
    for other in present[1:]:
        total.num_drafts += other.num_drafts
        total.num_draft_tokens += other.num_draft_tokens
        total.num_accepted_tokens += other.num_accepted_tokens
        for pos, value in enumerate(other.num_accepted_tokens_per_pos):
            total.num_accepted_tokens_per_pos[pos] += value
    return total
