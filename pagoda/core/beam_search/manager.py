"""The engine's side of beam search: beam groups in, one final ``RequestOutput`` per group out.

A beam-search request starts as one engine request (its prompt, computed once). Each of its live beams is an
engine request of its own whose sampling state asks for its top-K log-probabilities; the scheduler runs all of a
group's beams in the same step or none of them (:mod:`pagoda.core.beam_search.scheduling`). After each step
:meth:`BeamSearchManager.process` takes the group's rows out of the runner's output — the scheduler and the
output processor never see them — lets the group choose the next beams (:class:`BeamGroup`), and maps the
choice onto requests:

* a beam chosen once continues as the same request, with the chosen token appended (resent to the runner in
  full when that token isn't the one the runner appended, its argmax);
* a beam chosen more than once is forked for the extra choices: the new request shares all its KV blocks,
  reference-counted, and the first write to a shared last block copies it (copy-on-write, as ``n > 1`` forks);
* a beam no continuation chose is finished at once, which frees its blocks.

When the group is done every beam left is finished and the group's output (the ``beam_width`` best sequences,
best first) is returned, once.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from pagoda.core.beam_search.group import BeamGroup, Continuation, Hypothesis
from pagoda.core.request import Request, RequestStatus
from pagoda.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagoda.sampling_params import BeamSearchParams, SamplingParams


class BeamSearchManager:
    def __init__(self, scheduler: Any, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.groups: dict[str, BeamGroup] = {}
        self._beam_ids = itertools.count(1)

    def add(self, request_id: str, text: str | None, token_ids: list[int], params: BeamSearchParams,
            arrival_time: float | None, cache_salt: str | None, lora_request: Any = None) -> None:
        params = params.clone()
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        group = BeamGroup(request_id, params, text, list(token_ids), eos, max_tokens,
                          time.time() if arrival_time is None else arrival_time)
        # The runner only has to hand back each beam's top-K log-probabilities; EOS is the group's to judge.
        internal = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=group.num_candidates,
                                  ignore_eos=True, detokenize=False)
        root = Request(request_id, token_ids, internal, group.arrival_time, set(eos), cache_salt=cache_salt)
        root.beam_group = group
        root.lora_request = lora_request
        group.beams, group.scores, group.nodes = [root], [np.float32(0.0)], [None]
        self.groups[request_id] = group
        self.scheduler.add_request(root)

    # ------------------------------------------------------------------ after each step
    def process(self, sampled: dict[str, list[int]], logprobs: dict[str, tuple]) -> list[RequestOutput]:
        """Advance every group whose beams ran this step; removes their entries from ``sampled`` and
        ``logprobs``. Returns the outputs of the groups that finished."""
        outputs = []
        for group in list(self.groups.values()):
            if group.beams[0].request_id not in sampled:
                continue  # not run this step (or still in prefill)
            argmax, rows = [], []
            end = group.num_candidates + 1  # (a neighbour asking for more logprobs widens the step's rows)
            for beam in group.beams:
                argmax.append(sampled.pop(beam.request_id)[0])
                ids, values, _ = logprobs.pop(beam.request_id)
                rows.append((ids[1:end], values[1:end]))  # column 0 is the runner's own choice (the argmax)
            continuations = group.advance(rows)
            self._apply(group, continuations, argmax)
            if group.done:
                outputs.append(self._finish(group))
        return outputs

    def _apply(self, group: BeamGroup, continuations: list[Continuation], argmax: list[int]) -> None:
        scheduler, old = self.scheduler, group.beams
        if group.done:
            scheduler.finish_requests([beam.request_id for beam in old], RequestStatus.FINISHED_STOPPED)
            group.beams, group.scores, group.nodes = [], [], []
            return
        taken = [False] * len(old)
        beams = []
        for cont in continuations:
            parent = old[cont.beam]
            if not taken[cont.beam]:
                taken[cont.beam] = True
                beams.append((parent, cont))
                continue
            # Forked before the parent takes its own token: the child starts from the parent's sequence.
            child = Request(f"{group.request_id}-beam{next(self._beam_ids)}", parent.prompt_token_ids,
                            parent.params, parent.arrival_time, parent.eos_token_ids, parent_id=group.request_id,
                            cache_salt=parent.cache_salt)
            child.all_token_ids = list(parent.all_token_ids)
            child.lora_request = parent.lora_request
            child.output_token_ids = list(parent.output_token_ids)
            child.beam_group = group
            scheduler.fork_beam(parent, child)
            beams.append((child, cont))
        dropped = [beam.request_id for beam, chosen in zip(old, taken) if not chosen]
        if dropped:  # their blocks go back at once (those shared with surviving beams stay referenced)
            scheduler.finish_requests(dropped, RequestStatus.FINISHED_STOPPED)
        position = {id(beam): i for i, beam in enumerate(old)}
        for beam, cont in beams:
            beam.append_token(cont.token)
            # The runner appended its argmax to this beam; when that isn't the chosen token, resend the beam.
            index = position.get(id(beam))
            if index is None or argmax[index] != cont.token:
                scheduler.resend_in_full(beam)
        group.beams = [beam for beam, _ in beams]
        group.scores = [cont.score for cont in continuations]
        group.nodes = [cont.node for cont in continuations]

    # ------------------------------------------------------------------ ending
    def abort(self, request_id: str) -> bool:
        """Drop a group and free its beams; False if ``request_id`` is not a beam-search request."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        self.scheduler.finish_requests([beam.request_id for beam in group.beams], RequestStatus.FINISHED_ABORTED)
        group.beams = []
        return True

    def end_early(self, request_id: str) -> RequestOutput | None:
        """The group can't go on (its beams don't fit the KV cache): free it and return what it has."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        self.scheduler.finish_requests([beam.request_id for beam in group.beams], RequestStatus.FINISHED_LENGTH)
        group.beams = []
        return self._finish(group)

    def _finish(self, group: BeamGroup) -> RequestOutput:
        del self.groups[group.request_id]
        now = time.time()
        metrics = RequestMetrics(arrival_time=group.arrival_time, last_token_time=now, finished_time=now)
        outputs = [self._completion(index, hypothesis, group) for index, hypothesis in enumerate(group.results())]
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, prompt_logprobs=None, outputs=outputs,
                             finished=True, metrics=metrics)

    def _completion(self, index: int, hypothesis: Hypothesis, group: BeamGroup) -> CompletionOutput:
        nodes = hypothesis.node.path()
        token_ids = [node.token for node in nodes]
        decode = self._decode_token
        logprobs = [{tid: Logprob(value, rank + 1, decode(tid)) for rank, (tid, value) in
                     enumerate(zip(*node.candidates))} for node in nodes]
        text = ""
        if self.tokenizer is not None:
            ends_with_eos = hypothesis.finish_reason == "stop"
            text = self.tokenizer.decode(token_ids[:-1] if ends_with_eos else token_ids, skip_special_tokens=True)
            if ends_with_eos and group.params.include_stop_str_in_output:
                text += self.tokenizer.decode(token_ids[-1:], skip_special_tokens=False)
        return CompletionOutput(index=index, text=text, token_ids=token_ids,
                                cumulative_logprob=hypothesis.cum_logprob, logprobs=logprobs,
                                finish_reason=hypothesis.finish_reason)

    def _decode_token(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None
