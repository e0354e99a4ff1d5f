"""The event-loop side of a served request: :class:`RequestGroup`, the engine requests of one HTTP request and the
queue their outputs arrive on, and :func:`deliver_on_loop`, which hands each engine step's replies to their waiters.
The engine thread's side is :mod:`pagoda.entrypoints.openai.async_engine`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.async_engine import AsyncEngine


class RequestGroup:
    """The engine requests of one HTTP request, and the queue their outputs arrive on.

    Iterate with ``async for index, output in group``; it ends once every request has finished. Always call
    :meth:`abort` in a ``finally``: it aborts what hasn't finished (a no-op otherwise).
    """

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self._unfinished: set[int] = set()
        self._reserved = 0  # places taken in the engine's bounded queue, given back as requests end
        self._on_done: Callable[[], None] | None = None  # ends the group's use of its LoRA adapter
        self.arrival = time.monotonic()

    async def add(self, prompts: list[Any], params: Any, lora_request: Any = None) -> None:
        """Add one engine request per prompt (ids ``<request_id>-<i>``), with the LoRA adapter ``lora_request``
        if given; all or none are added.

        Raises ``ValueError`` (the engine's message, e.g. a prompt too long) or :class:`EngineDeadError`.
        """
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        self.engine._reserve(len(prompts))  # EngineOverloadedError when the queue is full
        self._reserved = len(prompts)
        if lora_request is not None and self.engine.lora_tracker is not None:
            self._on_done = self.engine.lora_tracker.acquire(lora_request)
        if len(prompts) == 1:
            ids = [self.request_id]
        else:
            ids = [f"{self.request_id}-{i}" for i in range(len(prompts))]
        self.request_ids = ids
        self._unfinished = set(range(len(ids)))
        future = asyncio.get_running_loop().create_future()
        items = [(rid, prompt, p, lora_request) for rid, prompt, p in zip(ids, prompts, params_list)]
        self.engine._submit(("add", self, items, future))
        try:
            await future
        except asyncio.CancelledError:
            self.abort()  # the engine may have added them after we stopped waiting
            raise
        except BaseException:
            self._unfinished.clear()
            self._release()
            raise

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            # the failed request is gone from the engine; the group's others (if any) are aborted by abort()
            raise item
        index, output = item
        if output.finished:
            self._unfinished.discard(index)
            self._release(1)
        return index, output

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        """Abort the requests that haven't finished; their KV blocks are freed on the engine's next turn."""
        if self._unfinished:
            ids = [self.request_ids[i] for i in sorted(self._unfinished)]
            self._unfinished.clear()
            self.engine._submit(("abort", ids), must=False)
        self._release()

    def _release(self, count: int | None = None) -> None:
        """Give back ``count`` (default: all remaining) of the group's places in the engine's queue."""
        count = self._reserved if count is None else min(count, self._reserved)
        self._reserved -= count
        self.engine._pending -= count
        if self._reserved == 0 and self._on_done is not None:  # the group is over
            on_done, self._on_done = self._on_done, None
            on_done()


def deliver_on_loop(batch: list[tuple[Any, Any]]) -> None:
    """On the event loop: hand one engine step's replies to the futures and groups waiting for them."""
    for target, item in batch:
        if target is None:  # a call nobody waits for
            continue
        if isinstance(target, asyncio.Future):
            if not target.done():
                if isinstance(item, BaseException):
                    target.set_exception(item)
                else:
                    target.set_result(item)
        else:
            target.queue.put_nowait(item)
