"""One data-parallel replica: a process that owns an ``LLMEngine`` and serves the client's commands.

The loop, run in the replica process (spawned by :class:`~pagoda.engine_dp.client.DPEngineClient`)::

    client ── ("add", [(id, prompt, params)]) / ("abort", ids) / ("call", name, args) / ("stop",) ──► pipe
    replica: run every queued command, then one engine.step() if it has work
    client ◄── ("out", outputs, stats) / ("failed", ids, message, stats) / ("reply", ok, value) ──── pipe

The replica blocks on the pipe while it has nothing to run, so an idle replica costs nothing. A step that raises
fails the requests it was running (the client turns that into :class:`ReplicaStepError` for them) and aborts
them; the replica serves on, as the single-engine server does. The pipe closing (the client process gone) ends
the replica, so a crashed server never leaves replicas behind.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import traceback
from typing import Any

# Steps failing this many times in a row mean the replica itself is broken: it exits, and the client reports it
# dead (the same bound as the single-engine server's).
MAX_CONSECUTIVE_STEP_FAILURES = 3


def replica_main(conn: Any, engine_args: Any, index: int, threads: int | None,
                 environment: dict[str, str] | None = None) -> None:
    """Entry point of replica ``index`` (a spawned process): build the engine, report ready, serve commands.
    ``environment`` (e.g. its ``CUDA_VISIBLE_DEVICES``) is set before any device is touched."""
    os.environ.update(environment or {})
    if threads is not None:
        # each replica its share of the cores; read by the CPU platform when the engine is built
        os.environ["PAGODA_CPU_THREADS"] = str(threads)
    # Ctrl-C reaches the whole process group: the server drains and then stops the replicas, which must not die
    # under its in-flight requests first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from pagoda.core.engine import LLMEngine

        engine = LLMEngine.from_engine_args(engine_args)
    except BaseException as exc:  # noqa: BLE001 - reported to the client, which raises it where the user waits
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        conn.close()
        return
    conn.send(("ready", engine.config.cache.num_blocks, engine.get_stats()))
    outbox = _Outbox(conn)
    try:
        _ReplicaLoop(engine, conn, outbox.put).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the client is gone: nothing left to serve
    finally:
        outbox.close()
        conn.close()


class _Outbox:
    """Sends on a thread of its own, so the loop never blocks on a full pipe while the client blocks sending it
    commands (both sides writing, neither reading, would deadlock)."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="pagoda-dp-outbox", daemon=True)
        self.thread.start()

    def put(self, message: tuple) -> None:
        self.queue.put(message)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(5.0)

    def _run(self) -> None:
        while True:
            message = self.queue.get()
            if message is None:
                return
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                return  # the client is gone; the loop notices on its next read


class _ReplicaLoop:
    def __init__(self, engine: Any, conn: Any, send: Any):
        self.engine = engine
        self.conn = conn
        self.send = send
        self.failures = 0  # consecutive failed steps

    def run(self) -> None:
        engine, conn = self.engine, self.conn
        while True:
            if not engine.has_unfinished_requests():
                conn.poll(None)  # idle: sleep until the client sends something (EOFError once it is gone)
            changed = False
            while conn.poll(0):
                command = conn.recv()
                if command[0] == "stop":
                    return
                self._handle(command)
                changed = True
            if engine.has_unfinished_requests():
                self._step()
            elif changed:  # e.g. an abort emptied the replica: the client's view of its load must follow
                self.send(("out", [], engine.get_stats()))

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            for request_id, prompt, params in command[1]:
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as exc:  # noqa: BLE001 - that request fails; the others go on
                    self.send(("failed", [request_id], f"{type(exc).__name__}: {exc}", None))
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "call":  # a method of the engine by name, its result or error sent back
            try:
                value = getattr(self.engine, command[1])(*command[2])
            except Exception as exc:  # noqa: BLE001 - the caller's failure, not the replica's
                self.send(("reply", False, f"{type(exc).__name__}: {exc}"))
            else:
                self.send(("reply", True, value))
        else:
            raise ValueError(f"unknown data-parallel command {kind!r}")

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as exc:  # noqa: BLE001 - fail that step's requests, serve the others on
            self.failures += 1
            if self.failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            ids = engine.failed_step_request_ids()
            engine.abort_request(ids)
            self.send(("failed", ids, f"{type(exc).__name__}: {exc}", engine.get_stats()))
            return
        self.failures = 0
        self.send(("out", outputs, engine.get_stats()))
