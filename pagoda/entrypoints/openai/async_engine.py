"""``AsyncEngine``: one engine serving every connection of the server.

The engine is synchronous and not thread-safe, so it lives on one dedicated thread that owns it completely:
every ``add_request``, ``abort_request``, ``step`` and ``get_stats`` happens there. The event loop talks to it
through a thread-safe inbox (commands) and gets results back through ``loop.call_soon_threadsafe`` — one call per
engine step carrying every output of that step, so the hand-over costs microseconds whatever the batch size.

Requests are submitted with ``RequestOutputKind.DELTA``: each output carries only what is new, so hand-over cost
doesn't grow with the length of the text. Requests of all clients join the same steps (continuous batching). Each
HTTP request owns a :class:`~pagoda.entrypoints.openai.request_group.RequestGroup` (``request_group.py``, the event
loop's side): one asyncio queue that receives ``(index, RequestOutput)`` for each of its engine requests (a
completions request with several prompts has several), in step order.

Life of a request::

    handler ── group.add(prompts) ──► inbox ──► engine thread: engine.add_request (ValueError → the handler)
    handler ◄── queue ◄── call_soon_threadsafe ◄── engine thread: engine.step() outputs
    handler exits early (client gone) ── group.abort() ──► inbox ──► engine.abort_request (frees KV blocks)
    adapter route ── call(fn) ──► inbox ──► engine thread: fn(engine), e.g. add_lora (its result or error back)

The server builds the engine on that same thread (:meth:`AsyncEngine.build`). Loading runs parallel torch ops, and
libgomp gives each thread that starts parallel regions a worker pool of its own; once the process holds more pooled
threads than cores, its threads stop spin-waiting at barriers and sleep at once. A decode step has a few hundred
barriers, so a model loaded on one thread and run on another slept and woke its threads ~200 times per step
(W3 on two cores: 560 output tokens/s against 584 when built on the engine thread).

If ``step()`` raises, the requests that step was running get an :class:`EngineStepError` (their clients a 500)
and are aborted, which frees their KV blocks; waiting requests and new ones are served on. Only when steps keep
failing (``MAX_CONSECUTIVE_STEP_FAILURES`` in a row, nothing completing in between) or the clean-up itself fails
is the engine dead — at once when a worker process of the executor is gone (``ExecutorDeadError``, also checked
while idle): every open request gets an :class:`EngineDeadError`, ``/health`` turns 503 and new requests
are refused.

The server holds at most ``max_pending`` unfinished engine requests (running plus waiting); a request that would
go beyond gets :class:`EngineOverloadedError` at once (a 503 with ``Retry-After``) instead of queueing without
bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pagoda.entrypoints.openai.metrics import ServerMetrics
from pagoda.entrypoints.openai.request_group import RequestGroup, deliver_on_loop
from pagoda.executor.interface import ExecutorDeadError
from pagoda.logger import init_logger

logger = init_logger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle engine thread sleeps on the inbox before refreshing stats
_STATS_EVERY_S = 0.02  # at most this often get_stats() while the engine is busy
# Steps failing this many times in a row mean the fault is not confined to some requests' data (a device that
# is gone, a corrupted cache): the engine is then declared dead rather than failing every request it is given.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The engine loop failed; the server can't serve requests any more."""


class EngineStoppedError(EngineDeadError):
    """The server is shutting down and ended the request."""


class EngineStepError(RuntimeError):
    """A step running this request raised; the request was aborted, the engine serves on."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class _Route:
    """Where one engine request's outputs go, and its timing (engine thread only)."""

    group: RequestGroup
    index: int
    arrival: float
    last_token_time: float | None = None


class AsyncEngine:
    """Runs an ``LLMEngine`` on its own thread and serves asyncio callers (see the module docstring)."""

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None, max_pending: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_pending = max_pending  # unfinished engine requests the server holds at most (None: no bound)
        self._pending = 0  # event-loop side: engine requests added and not yet finished or aborted
        self._step_failures = 0  # consecutive failed steps (engine thread)
        self.error: BaseException | None = None
        self.stats: Any = None  # the latest EngineStats, refreshed by the engine thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "dead" against new commands
        self._dead = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_stats = 0.0
        self._go: threading.Event | None = None  # set by start() for an engine thread made by build()
        self.lora_tracker: Any = None  # counts the requests using each LoRA adapter (serving_models.py)
        self.lora_info_reader: Callable[[Any], Any] | None = None  # the engine's adapters in use, for /metrics
        self.lora_info: Any = None  # its latest reading, refreshed with the stats

    @classmethod
    def build(cls, make_engine: Callable[[], Any], metrics: ServerMetrics | None = None) -> AsyncEngine:
        """Call ``make_engine()`` on a new engine thread, which then waits for :meth:`start` to run the engine
        there (see the module docstring for why); its exceptions are raised here."""
        async_engine = cls(None, metrics)
        built = threading.Event()
        async_engine._go = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                async_engine.engine = make_engine()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                failure.append(exc)
                return
            finally:
                built.set()
            async_engine._go.wait()
            async_engine._run()

        async_engine._thread = threading.Thread(target=main, name="pagoda-engine", daemon=True)
        async_engine._thread.start()
        built.wait()
        if failure:
            raise failure[0]
        return async_engine

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        """Start the engine loop on its thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._refresh_stats(force=True)
        if self._go is not None:
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine delivers to (None before :meth:`start`)."""
        return self._loop

    def new_group(self, request_id: str) -> RequestGroup:
        if self._dead:
            raise EngineDeadError(f"the engine can't serve requests: {self.error or 'it is shutting down'}")
        return RequestGroup(self, request_id)

    @property
    def is_healthy(self) -> bool:
        return self.error is None and not self._dead and self._thread is not None and self._thread.is_alive()

    def request_stop(self) -> None:
        """Abort whatever is left (its clients get :class:`EngineStoppedError`) and end the engine thread."""
        self._submit(("stop",), must=False)
        if self._go is not None:
            self._go.set()  # a built engine thread that was never started runs its loop just to stop

    async def stop(self, timeout: float = 10.0) -> None:
        """:meth:`request_stop`, then wait for the engine thread."""
        if self._thread is None:
            return
        self.request_stop()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(engine)`` run on the engine thread between steps (as requests are added); its result, or its
        exception, comes back here — a failing call never stops the engine."""
        future = asyncio.get_running_loop().create_future()
        self._submit(("call", fn, future))
        return await future

    def call_soon(self, fn: Callable[[Any], Any]) -> None:
        """``fn(engine)`` on the engine thread, nobody waiting for it (a failure is logged)."""
        self._submit(("call", fn, None), must=False)

    def _reserve(self, count: int) -> None:
        if self.max_pending is not None and count > self.max_pending:
            raise ValueError(f"prompt: {count} prompts in one request can never fit the server's queue of "
                             f"{self.max_pending} requests; send fewer at a time")
        if self.max_pending is not None and self._pending + count > self.max_pending:
            raise EngineOverloadedError(
                f"the server is at capacity ({self._pending} requests running or waiting, at most "
                f"{self.max_pending}); retry later")
        self._pending += count

    def _submit(self, command: tuple, must: bool = True) -> None:
        with self._lock:
            if self._dead:
                if must:
                    raise EngineDeadError(f"the engine failed and can't serve requests: {self.error}")
                return
            self._inbox.put(command)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        check_health = getattr(engine, "check_health", None)  # worker processes can die while the engine idles
        try:
            while True:
                busy = engine.has_unfinished_requests()
                if not self._handle_commands(block=not busy):
                    break
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as exc:  # noqa: BLE001 - fail that step's requests; re-raised if fatal
                        self._fail_step(exc)
                    else:
                        self._step_failures = 0
                        self._deliver(self._process(outputs))
                elif check_health is not None:
                    check_health()
                self._refresh_stats(force=not engine.has_unfinished_requests())
        except BaseException as exc:  # noqa: BLE001 - anything here kills the engine; report it everywhere
            logger.exception("the engine loop failed; failing all requests")
            self._close(exc, EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}"))
            return
        # stop: abort what's left so clients get their connection closed rather than hanging
        if self._routes:
            engine.abort_request(list(self._routes))
        self._close(None, EngineStoppedError("the server is shutting down; the request was not completed"))

    def _handle_commands(self, block: bool) -> bool:
        """Run queued commands; False when told to stop."""
        try:
            command = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        replies: list[tuple[Any, Any]] = []
        while True:
            kind = command[0]
            if kind == "stop":
                self._deliver(replies)
                return False
            if kind == "add":
                replies.append(self._add(command[1], command[2], command[3]))
            elif kind == "call":
                replies.append(self._call(command[1], command[2]))
            elif kind == "abort":
                live = [rid for rid in command[1] if self._routes.pop(rid, None) is not None]
                if live:
                    self.engine.abort_request(live)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._deliver(replies)
        return True

    def _fail_step(self, exc: Exception) -> None:
        """A step raised: fail and abort the requests it was running, so the others are served on. Raises (which
        kills the engine) when steps keep failing, the clean-up fails too, or the executor's workers are gone."""
        if isinstance(exc, ExecutorDeadError):
            raise exc
        self._step_failures += 1
        if self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise RuntimeError(f"{self._step_failures} engine steps failed in a row; the last: "
                               f"{type(exc).__name__}: {exc}") from exc
        ids = self.engine.failed_step_request_ids()
        logger.error("an engine step failed (%s: %s); failing the %d request(s) it was running", type(exc).__name__,
                     exc, len(ids), exc_info=exc)
        error = EngineStepError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        replies: list[tuple[Any, Any]] = []
        for request_id in ids:
            route = self._routes.pop(request_id, None)
            if route is not None:
                replies.append((route.group, error))
        self.engine.abort_request(ids)
        self._deliver(replies)

    def _call(self, fn: Callable[[Any], Any], future: asyncio.Future | None):
        try:
            result = fn(self.engine)
        except Exception as exc:  # noqa: BLE001 - the caller's failure, not the engine's
            if future is None:
                logger.error("a call on the engine thread failed: %s: %s", type(exc).__name__, exc)
            return future, exc
        return future, result

    def _add(self, group: RequestGroup, items: list[tuple[str, Any, Any, Any]], future: asyncio.Future):
        added = []
        try:
            for request_id, prompt, params, lora_request in items:
                if request_id in self._routes:
                    raise ValueError(f"request id {request_id!r} is already in use")
                self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
                added.append(request_id)
        except Exception as exc:  # noqa: BLE001 - the engine's validation errors go back to the handler
            if added:
                self.engine.abort_request(added)
            return future, exc
        for index, request_id in enumerate(added):
            self._routes[request_id] = _Route(group, index, group.arrival)
        return future, None

    def _process(self, outputs: list[Any]) -> list[tuple[Any, Any]]:
        """Route a step's outputs to their groups and record latency metrics."""
        now = time.monotonic()
        metrics = self.metrics
        batch = []
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:  # aborted meanwhile
                continue
            pooled = not isinstance(output.outputs, list)  # a PoolingRequestOutput: no tokens, one output
            new_tokens = 0 if pooled else sum(len(c.token_ids) for c in output.outputs)  # outputs are deltas
            if metrics is not None and new_tokens > 0:
                if route.last_token_time is None:
                    metrics.time_to_first_token.observe(now - route.arrival)
                else:
                    metrics.time_per_output_token.observe((now - route.last_token_time) / new_tokens)
            if new_tokens > 0:
                route.last_token_time = now
            if output.finished:
                del self._routes[output.request_id]
                if metrics is not None and not pooled:
                    metrics.request_finished(output, now - route.arrival)
            batch.append((route.group, (route.index, output)))
        return batch

    def _deliver(self, batch: list[tuple[Any, Any]]) -> None:
        if batch and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(deliver_on_loop, batch)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_stats >= _STATS_EVERY_S:
            self.stats = self.engine.get_stats()
            if self.lora_info_reader is not None:
                self.lora_info = self.lora_info_reader(self.engine)
            self._last_stats = now

    def _close(self, exc: BaseException | None, dead: EngineDeadError) -> None:
        """Refuse new commands and fail every open request with ``dead``; ``exc`` marks the engine unhealthy."""
        with self._lock:
            self._dead = True
            if exc is not None:
                self.error = exc
        replies: list[tuple[Any, Any]] = [(route.group, dead) for route in self._routes.values()]
        self._routes.clear()
        while True:  # commands that arrived before we were marked dead
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] in ("add", "call") and command[-1] is not None:
                replies.append((command[-1], dead))
        self._deliver(replies)
