"""``ray``: one Ray actor per rank, on one node or several (``--distributed-executor-backend ray``).

Arranged as vLLM arranges it. The executor joins the running Ray cluster (``RAY_ADDRESS``, or one started with
``ray start`` on this machine) or starts a local instance, then reuses the placement group it runs in or reserves
one of ``world_size`` bundles of the platform's device resource (``Platform.ray_device_key``: ``CPU``, ``GPU``…),
bundle 0 pinned to the driver's node. A worker actor (``num_cpus=0``: it lives on its bundle's reservation) wraps a
:class:`~pagoda.executor.worker.Worker`. Ranks are ordered with the driver's node first, then by node IP, so the
ranks of a node are contiguous (a tensor-parallel group stays on one node when it can); every node must have its
own IP. Each worker gets ``VLLM_HOST_IP`` = its node's IP and the driver's environment (``VLLM_*``, ``PAGODA_*``,
``HF_*``… but not ``VLLM_HOST_IP``, ``LOCAL_RANK`` or ``CUDA_VISIBLE_DEVICES``), and the ranks meet at a free port
on the driver's IP.

A step puts the ``SchedulerOutput`` in the object store once and submits it to every actor; the output rank
(``world_size - tensor_parallel_size``) returns the ``RunnerOutput``, the others ``None``, and any failure — an
actor that died, or an exception in a worker — is an :class:`~pagoda.executor.interface.ExecutorDeadError`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import weakref
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagoda import envs
from pagoda.core.model_runner import RunnerOutput
from pagoda.core.scheduler import SchedulerOutput
from pagoda.executor.interface import Executor, ExecutorDeadError
from pagoda.executor.out_of_process import WorkerFailure, check_supported
from pagoda.logger import init_logger

logger = init_logger(__name__)

#: Variables of the driver's environment that workers get (by prefix), and those that are per node or per rank.
COPIED_ENV_PREFIXES = ("VLLM_", "PAGODA_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "GLOO_", "NCCL_", "OMP_",
                       "TORCH_")
NOT_COPIED_ENV = ("VLLM_HOST_IP", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")
_PLACEMENT_TIMEOUT_S = 1800.0  # as vLLM: a cluster may still be adding nodes


@ray.remote
class RayWorkerWrapper:
    """A Ray actor holding one rank's :class:`~pagoda.executor.worker.Worker`."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.rank = -1

    def node_and_ip(self) -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def init_worker(self, config: Any, rank: int, local_rank: int, init_method: str, env: dict[str, str],
                    workers_on_node: int) -> int:
        os.environ.update(env)
        if "PAGODA_CPU_THREADS" not in env:  # this node's cores, shared by its workers
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            os.environ["PAGODA_CPU_THREADS"] = str(max(1, cores // workers_on_node))
        from pagoda.executor.worker import Worker

        self.rank = rank
        self.worker = Worker(config, rank, local_rank, init_method)
        return os.getpid()

    def execute_method(self, method: str, reply: bool, kwargs: dict[str, Any], *args: Any) -> Any:
        # args come one by one: Ray resolves object references only at the top level of a call
        try:
            result = getattr(self.worker, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the executor, which decides
            return WorkerFailure(self.rank, method, exc)
        return result if reply else None


class RayExecutor(Executor):
    name = "ray"

    def _init_workers(self, tokenizer: Any) -> None:
        check_supported(self.config)
        parallel = self.config.parallel
        world = parallel.world_size
        self.output_rank = parallel.output_rank
        self.step_timeout_s = envs.execute_model_timeout_s()
        self._dead: str | None = None
        self._owns_ray = False
        if not ray.is_initialized():
            from ray._private.services import canonicalize_bootstrap_address

            self._owns_ray = canonicalize_bootstrap_address(None) is None  # no cluster to join: a local one
            ray.init()
        self._owns_pg = False
        self._pg = get_current_placement_group()
        driver_ip = envs.host_ip() or _node_ip(ray.get_runtime_context().get_node_id())
        if self._pg is None:
            self._pg = self._reserve(world, driver_ip)
        elif len(self._pg.bundle_specs) < world:
            raise ValueError(f"the current Ray placement group has {len(self._pg.bundle_specs)} bundles, fewer than "
                             f"tensor_parallel_size × pipeline_parallel_size = {world}")
        self.workers: list[Any] = []
        self._finalizer = weakref.finalize(self, _release, self.workers, self._pg if self._owns_pg else None,
                                           self._owns_ray)
        try:
            self._start_actors(world, driver_ip)
            self.collective_rpc("init_device")
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    def _reserve(self, world: int, driver_ip: str) -> Any:
        key = self.config.platform.ray_device_key
        bundles: list[dict[str, float]] = [{key: 1.0} for _ in range(world)]
        bundles[0][f"node:{driver_ip}"] = 0.001  # rank 0's bundle on the driver's node
        pg = placement_group(bundles, strategy="PACK")
        self._owns_pg = True
        try:
            ray.get(pg.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ValueError(f"Ray could not reserve {world} × {{{key!r}: 1}} (one per rank, the first on the "
                             f"driver's node {driver_ip}) in {_PLACEMENT_TIMEOUT_S:g} s; cluster resources: "
                             f"{ray.cluster_resources()}") from None
        return pg

    def _start_actors(self, world: int, driver_ip: str) -> None:
        key = self.config.platform.ray_device_key
        device = {"num_gpus": 1} if key == "GPU" else ({} if key == "CPU" else {"resources": {key: 1}})
        actors = [RayWorkerWrapper.options(num_cpus=0, **device, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self._pg, placement_group_bundle_index=i, placement_group_capture_child_tasks=True)).remote()
            for i in range(world)]
        self.workers.extend(actors)  # owned from here on: released by shutdown whatever happens next
        places = ray.get([a.node_and_ip.remote() for a in actors])
        driver_node = ray.get_runtime_context().get_node_id()
        node_ips = {node: _node_ip(node) for node, _ in places}
        order = rank_order([node for node, _ in places], node_ips, driver_node)
        self.workers[:] = [actors[i] for i in order]
        nodes = [places[i][0] for i in order]
        self.worker_nodes = [node_ips[n] for n in nodes]
        host = _rendezvous_host(self.worker_nodes, driver_ip)
        init_method = f"tcp://{host}:{_free_port(host)}"
        env = {k: v for k, v in os.environ.items()
               if k.startswith(COPIED_ENV_PREFIXES) and k not in NOT_COPIED_ENV}
        calls = []
        for rank, (actor, node) in enumerate(zip(self.workers, nodes)):
            local_rank = nodes[:rank].count(node)
            calls.append(actor.init_worker.remote(self.config, rank, local_rank, init_method,
                                                  {**env, "VLLM_HOST_IP": node_ips[node]}, nodes.count(node)))
        self.worker_pids = ray.get(calls)
        logger.info("started %d Ray worker actors on nodes %s, rendezvous %s", world, self.worker_nodes, init_method)

    # ------------------------------------------------------------------ calls
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self._call(method, args, kwargs or {}, None, None)

    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        return self._call("execute_model", (sched,), {}, self.output_rank, self.step_timeout_s)[self.output_rank]

    def _call(self, method: str, args: tuple, kwargs: dict[str, Any], reply_rank: int | None,
              timeout_s: float | None) -> list[Any]:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)
        if args and len(self.workers) > 1:
            args = tuple(ray.put(a) for a in args)  # serialized once for every actor
        refs = [w.execute_method.remote(method, reply_rank is None or reply_rank == rank, kwargs, *args)
                for rank, w in enumerate(self.workers)]
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:  # any rank's failure is reported as soon as it is known, whichever rank it is
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                self._fail(f"{method} got no reply within {timeout_s:g} s (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)")
            rank = refs.index(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                self._fail(f"worker rank {rank} is gone: {type(exc).__name__}: {exc}")
            if isinstance(result, WorkerFailure):
                if method == "execute_model":
                    self._fail(result.describe())
                self._dead = f"the executor's workers failed: {result.describe()}"
                self.shutdown()
                raise result.as_rpc_error()
            results[rank] = result
        return results

    def _fail(self, message: str) -> None:
        self._dead = f"the executor's workers failed: {message}"
        logger.error("%s", self._dead)
        self.shutdown()
        raise ExecutorDeadError(self._dead)

    def check_health(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor was shut down"
        self._finalizer()


def _release(workers: list[Any], pg: Any, owns_ray: bool) -> None:
    """Kill the actors, remove the placement group this executor made, and stop Ray if it started it."""
    if not ray.is_initialized():
        return
    for actor in workers:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if owns_ray:
        ray.shutdown()


def rank_order(worker_nodes: list[str], node_ips: dict[str, str], driver_node: str) -> list[int]:
    """The workers (by index) in rank order: those on the driver's node first, then by their node's IP, so that a
    node's ranks are consecutive and tensor-parallel groups stay within a node where they can. Two nodes with one
    IP are an error: ranks are told apart by their node's IP (``VLLM_HOST_IP``)."""
    if len(set(node_ips.values())) != len(node_ips):
        raise ValueError(f"Every node should have a unique IP address; the workers' nodes have IPs "
                         f"{sorted(node_ips.values())}. Start each node with its own --node-ip-address and "
                         "set VLLM_HOST_IP to it")
    return sorted(range(len(worker_nodes)), key=lambda i: (worker_nodes[i] != driver_node,
                                                           ipaddress.ip_address(node_ips[worker_nodes[i]])))


def _node_ip(node_id: str) -> str:
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"Ray node {node_id} is not in the cluster")


def _rendezvous_host(worker_ips: list[str], driver_ip: str) -> str:
    """Where the ranks meet (as vLLM): loopback when every worker is on the driver's node, else the driver's IP."""
    return "127.0.0.1" if set(worker_ips) == {driver_ip} else driver_ip


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
