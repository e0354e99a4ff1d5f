"""Which data-parallel replica takes a new request (vLLM's DP load balancing, by request counts)."""

from __future__ import annotations


def pick_replica(unfinished: list[int], waiting: list[int], start: int) -> int:
    """The replica with the fewest unfinished requests; ties go to the fewest waiting, then to the first from
    ``start`` on (the caller advances ``start`` past each choice: round robin among equals).

    ``unfinished`` is counted by the client as it routes (exact at once); ``waiting`` is each replica's scheduler
    queue from its latest stats (a step old at most), which separates replicas whose batches are full.
    """
    size = len(unfinished)
    if size == 0 or len(waiting) != size:
        raise ValueError(f"pick_replica: need one count per replica, got {len(unfinished)} and {len(waiting)}")
    order = [(start + offset) % size for offset in range(size)]
    return min(order, key=lambda i: (unfinished[i], waiting[i]))
