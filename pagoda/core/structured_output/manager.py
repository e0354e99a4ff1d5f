"""``StructuredOutputManager``: the engine's side of constrained decoding.

Per request: its constraint is parsed when it is added (a bad schema, regex or grammar is a ``ValueError`` from
``add_request``), and compiled off the engine thread. A request whose grammar is still compiling is held here
with status ``WAITING_FOR_FSM`` and only handed to the scheduler once it is ready, so it never holds up the batch
(the scheduler serves waiting requests in order). Each sequence has its own ``GrammarMatcher``: forked samples
(``n > 1``) get a copy of the prompt's matcher before their first token; preemption recomputes KV entries but
never re-samples tokens, so a matcher that has accepted every output token is still right afterwards.

Per step: :meth:`step_bitmask` fills one bitmask for every constrained request that samples in the step, in one
batched xgrammar call; after the step :meth:`accept_tokens` advances the matchers with the sampled tokens. While
no constrained request is alive the engine calls neither, so unconstrained traffic pays nothing.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch

from pagoda.core.request import Request, RequestStatus
from pagoda.core.structured_output.backend import XgrammarBackend
from pagoda.core.structured_output.bitmask import StepGrammar
from pagoda.core.structured_output.config import StructuredOutputsConfig
from pagoda.core.structured_output.grammar_spec import grammar_spec, parse_grammar
from pagoda.logger import init_logger

logger = init_logger(__name__)

#: How long a step with nothing else to run waits for a grammar to compile before returning to its caller.
IDLE_COMPILE_WAIT_S = 0.05


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, tokenizer: Any, vocab_size: int, stop_token_ids: set[int],
                 max_num_seqs: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = set(stop_token_ids)
        self._backend: XgrammarBackend | None = None
        self.matchers: dict[str, Any] = {}  # sequence id → its GrammarMatcher, while the sequence runs
        self.pending: dict[str, tuple[Request, concurrent.futures.Future]] = {}  # waiting for their grammar
        self._max_rows = max_num_seqs
        self._bitmask: torch.Tensor | None = None
        self._batch_matcher: Any = None

    @property
    def backend(self) -> XgrammarBackend:
        if self._backend is None:
            self._backend = XgrammarBackend(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._backend

    # ------------------------------------------------------------------ requests
    def prepare(self, params: Any) -> None:
        """Validate a request's constraint (``ValueError`` naming the problem) and make its stop tokens end it:
        a grammar ends with EOS, which must stop the request even when it asked to ``ignore_eos``."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs: constraints need the tokenizer; this engine was started with "
                             "skip_tokenizer_init")
        parse_grammar(grammar_spec(params.structured_outputs, self.config))
        if params.ignore_eos or not self.stop_token_ids:
            extra = [t for t in self._grammar_stop_ids() if t not in params.stop_token_ids]
            params.stop_token_ids = list(params.stop_token_ids) + extra

    def _grammar_stop_ids(self) -> list[int]:
        if self.stop_token_ids:
            return sorted(self.stop_token_ids)
        return list(self.backend.compiler().tokenizer_info.stop_token_ids)  # xgrammar's detected ones

    def add_request(self, request: Request) -> bool:
        """Start compiling the request's grammar. True when it is ready (a cached grammar): the request may be
        scheduled now; False: it waits here until :meth:`admit` hands it over."""
        future = self.backend.compile_async(grammar_spec(request.params.structured_outputs, self.config))
        if future.done() and future.exception() is None:
            self.matchers[request.request_id] = self.backend.matcher(future.result())
            return True
        request.status = RequestStatus.WAITING_FOR_FSM
        self.pending[request.request_id] = (request, future)
        return False

    def admit(self, wait: bool) -> tuple[list[Request], list[tuple[Request, str]]]:
        """The waiting requests whose grammar is ready (to be scheduled), and those whose compilation failed, with
        the error. ``wait``: nothing else can run, so wait a little for a compilation to end instead of
        returning at once (the caller would only come straight back)."""
        if wait:
            concurrent.futures.wait([f for _, f in self.pending.values()], timeout=IDLE_COMPILE_WAIT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        ready, failed = [], []
        for rid, (request, future) in list(self.pending.items()):
            if not future.done():
                continue
            del self.pending[rid]
            error = future.exception()
            if error is not None:
                logger.error("request %s: its grammar failed to compile: %s", rid, error)
                failed.append((request, f"{type(error).__name__}: {error}"))
                continue
            self.matchers[rid] = self.backend.matcher(future.result())
            request.status = RequestStatus.WAITING
            ready.append(request)
        return ready, failed

    def discard(self, request_ids: list[str]) -> None:
        """Forget requests that end before reaching the scheduler (aborted while their grammar compiled)."""
        for rid in request_ids:
            self.pending.pop(rid, None)
            self.matchers.pop(rid, None)

    # ------------------------------------------------------------------ the step
    def step_bitmask(self, sched: Any, requests: dict[str, Request]) -> StepGrammar | None:
        """The bitmask of this step's constrained requests that sample (their every scheduled token computed)."""
        matchers = self.matchers
        for rid in sched.finished_request_ids:
            matchers.pop(rid, None)
        if not matchers:
            return None
        scheduled = sched.num_scheduled_tokens
        ids = [rid for rid in (matchers if len(matchers) <= len(scheduled) else scheduled)
               if rid in scheduled and rid in matchers]
        rows: dict[str, int] = {}
        active = []
        for rid in ids:
            request = requests[rid]
            if request.num_computed_tokens == request.num_tokens and not matchers[rid].is_terminated():
                rows[rid] = len(active)
                active.append(matchers[rid])
        if not active:
            return None
        bitmask = self._bitmask_rows(len(active))
        self._fill(active, bitmask)
        return StepGrammar(bitmask, rows, self.vocab_size)

    def _bitmask_rows(self, num: int) -> torch.Tensor:
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < num:
            self._bitmask = xgr.allocate_token_bitmask(max(num, self._max_rows), self.vocab_size)
        return self._bitmask[:num]

    def _fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        import xgrammar as xgr

        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
            return
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher("auto")
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept_tokens(self, results: list[tuple[Request, list[int]]]) -> list[Request]:
        """Advance each constrained sequence's matcher by its new tokens (a forked sample first copies its
        prompt's matcher). Returns the requests whose token the grammar refused — only possible when other
        sampling settings (``min_tokens``, ``allowed_token_ids``, ``logit_bias``, ``bad_words``) left no token
        the grammar allows; they must end."""
        matchers = self.matchers
        refused = []
        for request, tokens in results:
            matcher = matchers.get(request.request_id)
            if matcher is None:
                parent = matchers.get(request.parent_id) if request.parent_id is not None else None
                if parent is None:
                    continue
                matcher = matchers[request.request_id] = parent.fork()
            for token in tokens:
                if not matcher.accept_token(token):
                    logger.error("request %s: token %d is not allowed by its grammar; ending the request",
                                 request.request_id, token)
                    refused.append(request)
                    break
        return refused
