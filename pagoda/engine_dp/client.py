"""``DPEngineClient``: ``data_parallel_size`` engine replicas behind the interface of one ``LLMEngine``.

Each replica is a spawned process running its own ``LLMEngine`` (which may itself be tensor/pipeline parallel
through its executor) and the loop of :mod:`pagoda.engine_dp.replica`; the client talks to each over a
``multiprocessing`` pipe. The client offers what the server's engine thread and ``LLM`` use of an engine —
``add_request``, ``abort_request``, ``has_unfinished_requests``, ``step``, ``get_stats``,
``failed_step_request_ids``, ``tokenizer``, ``model_config``, ``config``, ``get_default_sampling_params`` — so
both run unchanged on N replicas.

- **Adding** checks the request here first (prompt length, token ids, logprobs, the structured-output constraint:
  the checks ``LLMEngine.add_request`` makes), so bad input is a ``ValueError`` at once, then sends it to the
  replica with the fewest unfinished requests (:func:`~pagoda.engine_dp.balance.pick_replica`) without waiting
  for it: a replica in the middle of a step doesn't hold the others up. A request its replica still refuses fails
  like a request of a failed step.
- **Stepping** waits (a few ms at most) for any replica's step results and returns every output that arrived;
  the replicas step on their own, concurrently.
- **Aborting** goes to the replica that holds the request.
- A replica whose process ends is fatal: ``step``/``get_stats`` raise :class:`ReplicaDiedError`, which the
  server's engine loop treats as its engine dying (every open request fails, ``/health`` answers 503).
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import os
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Iterable

from pagoda import envs
from pagoda.core.config import EngineConfig
from pagoda.core.generation_config import read_generation_config
from pagoda.core.engine import LLMEngine, check_beam_search
from pagoda.core.structured_output import StructuredOutputManager
from pagoda.core.tokenizer import load_tokenizer
from pagoda.engine_dp.balance import pick_replica
from pagoda.engine_dp.placement import replica_devices
from pagoda.engine_dp.replica import replica_main
from pagoda.engine_dp.stats import DPEngineStats, ReplicaStats, sum_replica_stats
from pagoda.logger import init_logger
from pagoda.sampling_params import BeamSearchParams, SamplingParams

logger = init_logger(__name__)

_STEP_WAIT_S = 0.005  # longest a step() waits for replica results, so new commands are taken in meanwhile
_START_TIMEOUT_S = 1800.0  # loading a large model can take long; a replica that dies is noticed at once
_STOP_TIMEOUT_S = 10.0


class ReplicaDiedError(RuntimeError):
    """A data-parallel replica's process ended: the engine can't serve its requests."""


class ReplicaStepError(RuntimeError):
    """A replica failed some requests (a failed step, or a request it refused); ``failed_step_request_ids()``
    names them. The other requests go on."""


@dataclass
class _Replica:
    index: int
    process: Any
    conn: Any
    stats: Any = None  # its latest EngineStats
    requests: set[str] = field(default_factory=set)
    requests_total: int = 0


class DPEngineClient:
    """N engine replicas in their own processes, presented as one engine (see the module docstring)."""

    def __init__(self, engine_args: Any) -> None:
        self.config = EngineConfig.from_engine_args(engine_args)
        size = self.config.parallel.data_parallel_size
        _check_supported(self.config)
        self.model_config = self.config.model
        self.tokenizer = None if self.model_config.skip_tokenizer_init else load_tokenizer(self.model_config)
        self.generation_config = read_generation_config(self.model_config)
        self.eos_token_ids = LLMEngine._eos_token_ids(self)
        self.structured_output = StructuredOutputManager(self.config.structured_outputs, self.tokenizer,
                                                         self.model_config.vocab_size, self.eos_token_ids,
                                                         self.config.scheduler.max_num_seqs)
        self.runner = None  # the models run in the replicas' processes
        self.pooler = None  # generation only (checked above)
        self._owner: dict[str, _Replica] = {}
        self._outputs: list[Any] = []  # arrived, not yet returned by step()
        self._failed_ids: list[str] = []
        self._failure: str | None = None
        self._dead: ReplicaDiedError | None = None
        self._next = 0  # round-robin start among equally loaded replicas
        self._replicas: list[_Replica] = []
        self._closed = False
        self._start(dataclasses.replace(engine_args, data_parallel_size=1), size)
        weakref.finalize(self, _stop_replicas, list(self._replicas))
        atexit.register(_stop_replicas, list(self._replicas))  # before multiprocessing joins its children

    # ------------------------------------------------------------------ start and stop
    def _start(self, replica_args: Any, size: int) -> None:
        devices = replica_devices(self.config.platform, size, self.config.parallel.world_size)
        threads = None
        if envs.cpu_omp_threads() is None:  # each replica its share of the cores (PAGODA_CPU_THREADS wins)
            threads = max(1, len(os.sched_getaffinity(0)) // size)
        context = multiprocessing.get_context("spawn")
        for index in range(size):
            parent_conn, child_conn = context.Pipe()
            process = context.Process(target=replica_main,
                                      args=(child_conn, replica_args, index, threads, devices[index]),
                                      name=f"pagoda-dp-replica-{index}")
            process.start()
            child_conn.close()
            self._replicas.append(_Replica(index, process, parent_conn))
        try:
            num_blocks = [self._wait_ready(replica) for replica in self._replicas]
        except BaseException:
            _stop_replicas(self._replicas)
            raise
        # what a request is checked against here: the smallest replica cache
        self.config.cache.num_blocks = min(num_blocks)
        logger.info("data parallel: %d engine replicas ready (processes %s), %s", size,
                    ", ".join(str(r.process.pid) for r in self._replicas),
                    f"{threads} thread(s) each" if threads else "PAGODA_CPU_THREADS threads each")

    def _wait_ready(self, replica: _Replica) -> int:
        ready = wait([replica.conn, replica.process.sentinel], timeout=_START_TIMEOUT_S)
        message = None
        if replica.conn in ready or replica.conn.poll(0):
            try:
                message = replica.conn.recv()
            except EOFError:
                message = None
        if message is None:
            raise RuntimeError(f"data-parallel replica {replica.index} exited while starting (exit code "
                               f"{replica.process.exitcode})")
        if message[0] == "error":
            raise RuntimeError(f"data-parallel replica {replica.index} failed to start: {message[1]}")
        _, num_blocks, replica.stats = message
        return num_blocks

    def shutdown(self) -> None:
        """Stop every replica (each finishes its current step and exits)."""
        self._closed = True
        _stop_replicas(self._replicas)

    # ------------------------------------------------------------------ requests
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config)

    def tokenize_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        return LLMEngine.tokenize_prompt(self, prompt)

    def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None,
                    lora_request: Any = None) -> None:
        self._raise_if_dead()
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported with data_parallel_size > 1")
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self._check(token_ids, params)
        # the replica gets the token ids: the prompt is tokenized once, here
        sent = dict(prompt) if isinstance(prompt, dict) else {}
        sent.update(prompt=text, prompt_token_ids=token_ids)
        replica = self._replicas[self._pick()]
        self._send(replica, ("add", [(request_id, sent, params)]))
        self._owner[request_id] = replica
        replica.requests.add(request_id)
        replica.requests_total += 1

    def _check(self, token_ids: list[int], params: Any) -> None:
        """The checks ``LLMEngine.add_request`` makes before a request is queued (``ValueError`` naming the
        field)."""
        if isinstance(params, BeamSearchParams):
            check_beam_search(self.config, params)
            LLMEngine._validate(self, token_ids, SamplingParams(max_tokens=1))
            return
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: data-parallel engines serve text generation (SamplingParams or "
                             f"BeamSearchParams), got {type(params).__name__}")
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        LLMEngine._validate(self, token_ids, params)
        if params.structured_outputs is not None:
            self.structured_output.prepare(params.clone())

    def _pick(self) -> int:
        replicas = self._replicas
        unfinished = [len(r.requests) for r in replicas]
        waiting = [getattr(r.stats, "num_waiting", 0) for r in replicas]
        index = pick_replica(unfinished, waiting, self._next)
        self._next = (index + 1) % len(replicas)
        return index

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            replica = self._owner.pop(request_id, None)
            if replica is not None:
                replica.requests.discard(request_id)
                by_replica.setdefault(replica.index, []).append(request_id)
        for index, ids in by_replica.items():
            try:
                self._send(self._replicas[index], ("abort", ids))
            except ReplicaDiedError:
                pass  # its requests are gone with it

    def has_unfinished_requests(self) -> bool:
        # outputs or failures taken in but not yet returned by step() count: their requests aren't over for the
        # caller until step() hands them over
        return bool(self._owner or self._outputs or self._failed_ids)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[Any]:
        """Every output the replicas have produced since the last call (waiting a few ms for one)."""
        if not self._outputs and not self._failed_ids:
            self._raise_if_dead()
            busy = [r.conn for r in self._replicas if r.requests]
            sentinels = [r.process.sentinel for r in self._replicas]
            wait(busy + sentinels if busy else sentinels, timeout=_STEP_WAIT_S if busy else 0)
        self._drain()
        if self._failed_ids:
            raise ReplicaStepError(f"a data-parallel replica failed: {self._failure}")
        outputs, self._outputs = self._outputs, []
        return outputs

    def failed_step_request_ids(self) -> list[str]:
        """After ``step()`` raised: the requests that failed (their replicas have dropped them)."""
        self._raise_if_dead()
        ids, self._failed_ids = self._failed_ids, []
        return ids

    def _drain(self) -> None:
        """Take in every message the replicas have sent."""
        for replica in self._replicas:
            try:
                while replica.conn.poll(0):
                    self._receive(replica, replica.conn.recv())
            except (EOFError, OSError):
                self._mark_dead(replica)
        self._raise_if_dead()

    def _receive(self, replica: _Replica, message: tuple) -> Any:
        kind = message[0]
        if kind == "out":
            _, outputs, replica.stats = message
            for output in outputs:
                if output.request_id not in replica.requests:
                    continue  # aborted meanwhile
                if output.finished:
                    replica.requests.discard(output.request_id)
                    del self._owner[output.request_id]
                self._outputs.append(output)
        elif kind == "failed":
            _, ids, self._failure, stats = message
            replica.stats = stats if stats is not None else replica.stats
            for request_id in ids:
                if request_id in replica.requests:
                    replica.requests.discard(request_id)
                    del self._owner[request_id]
                    self._failed_ids.append(request_id)
        return message

    # ------------------------------------------------------------------ calls on every replica
    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``engine.<method>(*args)`` on every replica, between its steps; the results in replica order."""
        for replica in self._replicas:
            self._send(replica, ("call", method, args))
        results = []
        for replica in self._replicas:
            while True:
                ready = wait([replica.conn, replica.process.sentinel])
                try:
                    message = replica.conn.recv() if replica.conn in ready or replica.conn.poll(0) else None
                except EOFError:
                    message = None
                if message is None:
                    self._mark_dead(replica)
                    self._raise_if_dead()
                if message[0] == "reply":
                    if not message[1]:
                        raise RuntimeError(f"data-parallel replica {replica.index}: {method}: {message[2]}")
                    results.append(message[2])
                    break
                self._receive(replica, message)
        return results

    def warm_up(self, prompt_len: int = 128) -> None:
        """``LLMEngine.warm_up`` on every replica at once."""
        self.call_all("warm_up", prompt_len)

    # ------------------------------------------------------------------ stats and health
    def get_stats(self) -> DPEngineStats:
        """The replicas' latest stats summed (KV usage over all their blocks), with each replica's load."""
        self._raise_if_dead()
        for replica in self._replicas:
            if replica.process.exitcode is not None:
                self._mark_dead(replica)
        self._drain()  # an idle caller doesn't step: the replicas' latest stats (e.g. after an abort) come in here
        loads = [ReplicaStats(r.index, r.stats.num_running, r.stats.num_waiting, len(r.requests),
                              r.requests_total) for r in self._replicas]
        return sum_replica_stats([r.stats for r in self._replicas], loads)

    def _send(self, replica: _Replica, message: tuple) -> None:
        try:
            replica.conn.send(message)
        except (OSError, EOFError):
            self._mark_dead(replica)
            self._raise_if_dead()

    def _mark_dead(self, replica: _Replica) -> None:
        if self._dead is None:
            replica.process.join(1.0)
            how = "was stopped" if self._closed else f"exited with code {replica.process.exitcode}"
            self._dead = ReplicaDiedError(f"data-parallel replica {replica.index} (pid {replica.process.pid}) "
                                          f"{how}; its requests are lost")
            logger.error("%s", self._dead)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise self._dead


def _check_supported(config: EngineConfig) -> None:
    """What a replica set can't do yet: a ``ValueError`` naming the feature and data_parallel_size."""
    size = config.parallel.data_parallel_size
    if config.model.task != "generate":
        raise ValueError(f"data_parallel_size: {size} replicas serve text generation; the {config.model.task!r} "
                         "task (pooling) runs with data_parallel_size 1")
    if config.lora is not None:
        raise ValueError(f"enable_lora: LoRA adapters are not supported with data_parallel_size {size}; serve "
                         "them with data_parallel_size 1")


def _stop_replicas(replicas: list[_Replica]) -> None:
    """Ask each replica to stop, then wait for it (killing one that doesn't end in time)."""
    for replica in replicas:
        if replica.process.exitcode is None:
            try:
                replica.conn.send(("stop",))
            except (OSError, EOFError):
                pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for replica in replicas:
        replica.process.join(max(0.0, deadline - time.monotonic()))
        if replica.process.exitcode is None:
            replica.process.kill()
            replica.process.join(5.0)
        replica.conn.close()
