"""Scheduling a beam group as a unit: all of its live beams run in a step, or none of them.

The scheduler mixes this in. A group's beams are kept next to each other in ``running`` (forks are inserted
after their parent) and in ``waiting`` (a preempted group goes back to the front in order), so the scheduler
meets a group at its first beam and handles the whole of it here.

A group samples only in a step where every beam samples: normally each beam has one token to decode. After a
preemption each beam is recomputed from its prefix-cache hits; when all of their missing tokens fit the step's
budget they run together and sample, otherwise each runs a chunk that stops short of its last token, so none
samples until the step where the last tokens of all of them run together. A group of one beam (a prompt before
its first beams are chosen) is an ordinary request.
"""

from __future__ import annotations

from typing import Any

from pagoda.core.request import Request, RequestStatus


def is_beam_group(request: Request) -> bool:
    """Whether ``request`` is a beam of a group that has several (which the scheduler must move as a unit)."""
    group = request.beam_group
    return group is not None and len(group.beams) > 1


def _token_counts(missing: list[int], budget: int) -> list[int]:
    """Tokens per beam this step: all that are missing when they fit together (every beam then samples),
    else chunks that leave each beam's last token for a later step."""
    if sum(missing) <= budget:
        return list(missing)
    counts = []
    for num in missing:
        count = min(max(num - 1, 0), budget)
        counts.append(count)
        budget -= count
    return counts


class BeamGroupScheduling:
    """Group-aware parts of :class:`~pagoda.core.scheduler.Scheduler` (which defines the attributes used)."""

    running: list[Request]
    waiting: Any
    requests: dict[str, Request]
    kv: Any
    _known_blocks: dict[str, int]

    def _preempt_last(self) -> list[Request]:
        """Preempt the most recently admitted running request — with its whole beam group if it has one."""
        victim = self.running[-1]
        if not is_beam_group(victim):
            self.running.pop()
            self._preempt(victim)
            return [victim]
        members = victim.beam_group.beams  # the last len(members) entries of running
        del self.running[-len(members):]
        for member in reversed(members):  # each goes to the front: reversed keeps them in order there
            self._preempt(member)
        return list(members)

    def _schedule_running_group(self, index: int, budget: int, out: Any,
                                scheduled: list[Request]) -> tuple[int, bool, bool]:
        """Schedule the group whose first beam is ``running[index]``. Returns (tokens scheduled, whether any
        request was preempted, whether the group itself was)."""
        beams = list(self.running[index].beam_group.beams)
        counts = _token_counts([b.num_tokens - b.num_computed_tokens for b in beams], budget)
        if not any(counts):
            return 0, False, False
        preempted = False
        for beam, count in zip(beams, counts):
            if count == 0:
                continue
            while not self.kv.allocate_slots(beam, count):
                victims = self._preempt_last()
                preempted = True
                if beam in victims:
                    return 0, True, True
        for beam, count in zip(beams, counts):
            if count:
                scheduled.append(beam)
                out.num_scheduled_tokens[beam.request_id] = count
        return sum(counts), preempted, False

    def _admit_group(self, budget: int, out: Any, scheduled: list[Request]) -> int:
        """Admit the preempted group at the front of ``waiting``, all of its beams or none. Returns the tokens
        scheduled (0: it didn't fit)."""
        beams = list(self.waiting[0].beam_group.beams)
        block_size = self.kv.block_size
        hits = [self.kv.get_computed_blocks(beam) for beam in beams]
        counts = _token_counts([beam.num_tokens - len(h) * block_size for beam, h in zip(beams, hits)], budget)
        if not any(counts):
            return 0
        allocated = []
        for beam, beam_hits, count in zip(beams, hits, counts):
            if not self.kv.allocate_slots(beam, count, beam_hits):
                for done in allocated:
                    self.kv.free(done)
                return 0
            allocated.append(beam)
        for beam, beam_hits, count in zip(beams, hits, counts):
            self.waiting.popleft()
            num_cached = len(beam_hits) * block_size
            if beam.num_cached_tokens < 0:
                beam.num_cached_tokens = num_cached
            beam.num_computed_tokens = num_cached
            beam.status = RequestStatus.RUNNING
            self.running.append(beam)
            self._known_blocks.pop(beam.request_id, None)
            if count:
                scheduled.append(beam)
                out.num_scheduled_tokens[beam.request_id] = count
        return sum(counts)

    # ------------------------------------------------------------------ what the beam search asks for
    def fork_beam(self, parent: Request, child: Request) -> None:
        """Run ``child`` next to ``parent``, sharing its KV blocks (copy-on-write)."""
        child.num_cached_tokens = parent.num_cached_tokens
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.kv.fork(parent, child)
        self.requests[child.request_id] = child
        self.running.insert(self.running.index(parent) + 1, child)

    def resend_in_full(self, request: Request) -> None:
        """Send ``request`` to the runner in full next step (its last token changed)."""
        self._known_blocks.pop(request.request_id, None)
