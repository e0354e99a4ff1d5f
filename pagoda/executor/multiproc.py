"""``mp``: one worker process per rank on this machine (the default when tensor × pipeline parallel size > 1).

Each worker process runs a :class:`~pagoda.executor.worker.Worker` in a loop: read a call from its command pipe,
run it, write the result to its result pipe. A call is pickled once and the same bytes are written to every
worker's pipe. For a step (``execute_model``) only the output rank — the first tensor-parallel rank of the last
pipeline stage, global rank ``world_size - tensor_parallel_size``, as in vLLM — sends its ``RunnerOutput`` back;
the other ranks run the step and stay silent unless it fails.

Failure is never a hang: the executor waits on the result pipes together with every worker's process sentinel, so
a worker that is killed, runs out of memory or raises makes the call fail promptly with
:class:`~pagoda.executor.interface.ExecutorDeadError` (carrying the worker's traceback), and the workers are then
stopped. A step also fails after ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 by default). Workers exit on their own
if the engine's process goes away, and are stopped when the executor is garbage-collected or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from multiprocessing import current_process, get_context
from multiprocessing.connection import Connection, wait
from typing import Any

from pagoda import envs
from pagoda.core.model_runner import RunnerOutput
from pagoda.core.scheduler import SchedulerOutput
from pagoda.executor.interface import Executor, ExecutorDeadError
from pagoda.executor.out_of_process import WorkerFailure, check_supported, worker_thread_env
from pagoda.logger import init_logger
from pagoda.utils import environ_set

logger = init_logger(__name__)

START_METHODS = ("spawn", "fork", "forkserver")
_STOP = pickle.dumps((None, (), {}, None))
_GRACE_S = 3.0  # how long stopping workers may take before they are terminated, and again before they are killed


class MultiprocExecutor(Executor):
    name = "mp"

    def _init_workers(self, tokenizer: Any) -> None:
        check_supported(self.config)
        parallel = self.config.parallel
        world = parallel.world_size
        self.output_rank = parallel.output_rank
        method = envs.worker_multiproc_method()
        if method not in START_METHODS:
            raise ValueError(f"VLLM_WORKER_MULTIPROC_METHOD: must be one of {', '.join(START_METHODS)}, got {method!r}")
        self.step_timeout_s = envs.execute_model_timeout_s()
        host = envs.host_ip() or "127.0.0.1"
        init_method = self.distributed_init_method = f"tcp://{host}:{_free_port(host)}"
        ctx = get_context(method)
        if current_process().daemon:  # Python forbids it; say so before any worker is half-started
            raise RuntimeError(f"the mp executor can't start worker processes from a daemonic process "
                               f"({current_process().name}); start the process that builds this engine with "
                               "daemon=False")
        self._procs: list[Any] = []
        self._commands: list[Connection] = []
        self._results: list[Connection] = []
        self._dead: str | None = None
        # Registered before the first start, so a failure part-way still stops the workers already running.
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._commands)
        atexit.register(self._finalizer)  # before multiprocessing's own exit hook, which would wait for them
        with environ_set(worker_thread_env(world)):  # read by the worker before it imports torch
            for rank in range(world):
                command_reader, command_writer = ctx.Pipe(duplex=False)
                result_reader, result_writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, name=f"pagoda-worker-{rank}", daemon=True,
                                   args=(self.config, rank, rank, init_method, command_reader, result_writer,
                                         os.getpid()))
                proc.start()
                command_reader.close()  # the worker's ends: closing ours lets a worker's death read as EOF here
                result_writer.close()
                self._procs.append(proc)
                self._commands.append(command_writer)
                self._results.append(result_reader)
        self._rank_of = {conn: rank for rank, conn in enumerate(self._results)}
        self._rank_of.update({proc.sentinel: rank for rank, proc in enumerate(self._procs)})
        logger.info("started %d worker processes (%s, pids %s), rendezvous %s", world, method,
                    [p.pid for p in self._procs], init_method)
        try:
            self.collective_rpc("init_device")
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ calls
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        replies = self._call(method, args, kwargs or {}, None, None)
        return [replies[rank] for rank in range(len(self._procs))]

    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        return self._call("execute_model", (sched,), {}, self.output_rank, self.step_timeout_s)[self.output_rank]

    def _call(self, method: str, args: tuple, kwargs: dict[str, Any], reply_rank: int | None,
              timeout_s: float | None) -> dict[int, Any]:
        """Send one call to every worker; the replies of ``reply_rank`` (None: every rank), by rank."""
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)
        data = pickle.dumps((method, args, kwargs, reply_rank), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._commands):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                self._fail(f"worker rank {rank} can't be reached ({type(exc).__name__}: {exc})", rpc=None)
        pending = set(range(len(self._procs))) if reply_rank is None else {reply_rank}
        replies: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        watched = self._results + [proc.sentinel for proc in self._procs]
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(watched, left)
            if not ready:
                self._fail(f"{method} got no reply from worker rank(s) {sorted(pending)} within {timeout_s:g} s "
                           "(VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)", rpc=None)
            # Replies first: a worker that reported its failure and then exited is described by its report.
            for obj in sorted(ready, key=lambda o: not isinstance(o, Connection)):
                rank = self._rank_of[obj]
                if isinstance(obj, Connection):
                    reply = self._receive(rank)
                    if isinstance(reply, WorkerFailure):
                        self._fail(reply.describe(), rpc=None if method == "execute_model" else reply)
                    replies[rank] = reply
                    pending.discard(rank)
                elif not self._results[rank].poll():
                    proc = self._procs[rank]
                    self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} during "
                               f"{method}", rpc=None)
        return replies

    def _receive(self, rank: int) -> Any:
        try:
            return self._results[rank].recv()
        except (EOFError, OSError):
            proc = self._procs[rank]
            proc.join(1.0)
            self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}", rpc=None)

    def _fail(self, message: str, rpc: WorkerFailure | None) -> None:
        """Mark the executor dead, stop the workers, and raise (an RPC's own exception for a failed call)."""
        self._dead = f"the executor's workers failed: {message}"
        logger.error("%s", self._dead)
        self.shutdown()
        if rpc is not None:
            raise rpc.as_rpc_error()
        raise ExecutorDeadError(self._dead)

    # ------------------------------------------------------------------ health and shutdown
    def check_health(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}", rpc=None)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor was shut down"
        self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]


def _stop_workers(procs: list[Any], commands: list[Connection]) -> None:
    """Ask every worker to exit; terminate the ones still there after a grace period, then kill them."""
    for conn in commands:
        with contextlib.suppress(OSError):
            conn.send_bytes(_STOP)
        conn.close()
    for signal_them in (None, "terminate", "kill"):
        if signal_them is not None:
            for proc in procs:
                if proc.is_alive():
                    getattr(proc, signal_them)()
        deadline = time.monotonic() + _GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if not any(proc.is_alive() for proc in procs):
            return


def _free_port(host: str) -> int:
    """A free TCP port on ``host``: the first from ``VLLM_PORT`` upwards if it is set (as vLLM), else any."""
    first = envs.port()
    candidates = range(first, min(first + 100, 65536)) if first else [0]
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ValueError(f"VLLM_PORT: no free port on {host} in {first}..{candidates[-1]}")


# ---------------------------------------------------------------------------- the worker process
def _worker_main(config: Any, rank: int, local_rank: int, init_method: str, commands: Connection,
                 results: Connection, parent_pid: int) -> None:
    from pagoda.distributed import destroy_model_parallel
    from pagoda.executor.worker import Worker

    prefix = f"(Worker rank={rank} pid={os.getpid()}) "  # vLLM's prefix on every line a worker prints
    original_stderr = sys.stderr
    sys.stdout, sys.stderr = _Prefixed(sys.stdout, prefix), _Prefixed(sys.stderr, prefix)
    for handler in logging.getLogger("pagoda").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is original_stderr:
            handler.setStream(sys.stderr)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    worker = Worker(config, rank, local_rank, init_method)
    try:
        while True:
            try:
                method, args, kwargs, reply_rank = pickle.loads(commands.recv_bytes())
            except (EOFError, OSError):
                break  # the executor is gone
            if method is None:
                break
            try:
                result = getattr(worker, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported to the executor, which decides
                results.send(WorkerFailure(rank, method, exc))
                continue
            if reply_rank is None or reply_rank == rank:
                results.send(result)
    finally:
        destroy_model_parallel()


class _Prefixed:
    """A text stream writing ``prefix`` at the start of every line."""

    def __init__(self, stream: Any, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
        self._line_start = True

    def write(self, text: str) -> int:
        pieces = []
        for line in text.splitlines(keepends=True):
            if self._line_start:
                pieces.append(self._prefix)
            pieces.append(line)
            self._line_start = line.endswith("\n")
        self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the engine's process is gone (even if it is stuck in a collective)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)
