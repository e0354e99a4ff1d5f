"""Prometheus metrics of the server, under vLLM's names, in a registry of the server's own.

Gauges and token counters are read from the engine's latest ``EngineStats`` at scrape time (the engine thread
refreshes that snapshot), so scraping never touches the engine. Latency histograms are observed by the engine
thread as outputs come out of ``step()``; prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

# vLLM's buckets, so dashboards built for vLLM read ours unchanged
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineStatsCollector:
    """Turns the latest ``EngineStats`` into gauges and counters when scraped."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str,
                 get_lora_info: Callable[[], Any] | None = None):
        self.get_stats = get_stats
        self.model_name = model_name
        self.get_lora_info = get_lora_info

    def collect(self):
        stats = self.get_stats()
        labels = ["model_name"]
        values = {
            "num_requests_running": getattr(stats, "num_running", 0),
            "num_requests_waiting": getattr(stats, "num_waiting", 0),
            "kv_cache_usage_perc": getattr(stats, "kv_cache_usage", 0.0),
        }
        helps = {
            "num_requests_running": "Number of requests in model execution batches.",
            "num_requests_waiting": "Number of requests waiting to be processed.",
            "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
        }
        for name, value in values.items():
            family = GaugeMetricFamily(f"vllm:{name}", helps[name], labels=labels)
            family.add_metric([self.model_name], float(value))
            yield family
        for name, attr, text in (("prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),
                                 ("generation_tokens", "generation_tokens_total",
                                  "Number of generation tokens processed."),
                                 ("num_preemptions", "num_preemptions_total",
                                  "Cumulative number of preemptions from the engine.")):
            family = CounterMetricFamily(f"vllm:{name}", text, labels=labels)
            family.add_metric([self.model_name], float(getattr(stats, attr, 0)))
            yield family
        spec = getattr(stats, "spec_decoding", None)
        if spec is not None:
            yield from _spec_decode_families(spec, self.model_name)
        replicas = getattr(stats, "replicas", None)
        if replicas:  # data parallel: the sums above, and each replica's load under its "engine" label
            yield from _replica_families(replicas, self.model_name)
        lora = self.get_lora_info() if self.get_lora_info is not None else None
        if lora is not None:  # vLLM's: the adapters in use as labels, the time of the reading as the value
            running, waiting, max_lora, when = lora
            family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                       labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            family.add_metric([str(max_lora), waiting, running], when)
            yield family


def _spec_decode_families(spec: Any, model_name: str):
    """vLLM's speculative-decoding counters: acceptance rate = accepted / draft tokens, mean accepted length =
    1 + accepted / drafts."""
    for name, value, text in (
            ("num_drafts", spec.num_drafts, "Number of spec decoding drafts."),
            ("num_draft_tokens", spec.num_draft_tokens, "Number of draft tokens."),
            ("num_accepted_tokens", spec.num_accepted_tokens, "Number of accepted tokens.")):
        family = CounterMetricFamily(f"vllm:spec_decode_{name}", text, labels=["model_name"])
        family.add_metric([model_name], float(value))
        yield family
    family = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                 "Accepted tokens per draft position.", labels=["model_name", "position"])
    for position, value in enumerate(spec.num_accepted_tokens_per_pos):
        family.add_metric([model_name, str(position)], float(value))
    yield family


def _replica_families(replicas: list[Any], model_name: str):
    """Per data-parallel replica (label ``engine``, vLLM's name for the DP rank): its load, and the requests the
    balancer has sent it."""
    labels = ["model_name", "engine"]
    for name, attr, text in (("num_requests_running", "num_running", "Requests in the replica's batches."),
                             ("num_requests_waiting", "num_waiting", "Requests waiting in the replica."),
                             ("num_requests_unfinished", "num_unfinished", "Requests routed to the replica and "
                                                                           "not finished.")):
        family = GaugeMetricFamily(f"pagoda:dp_engine_{name}", text, labels=labels)
        for replica in replicas:
            family.add_metric([model_name, str(replica.index)], float(getattr(replica, attr)))
        yield family
    family = CounterMetricFamily("pagoda:dp_engine_requests", "Requests routed to the replica.", labels=labels)
    for replica in replicas:
        family.add_metric([model_name, str(replica.index)], float(replica.requests_total))
    yield family


class ServerMetrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, model_name: str, get_stats: Callable[[], Any], get_lora_info: Callable[[], Any] | None = None):
        disable_created_metrics()  # the *_created samples only add noise to every scrape (vLLM drops them too)
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        label = {"model_name": model_name}
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               ["model_name"], buckets=TTFT_BUCKETS, registry=self.registry)
        self._tpot = Histogram("vllm:time_per_output_token_seconds",
                               "Histogram of time per output token (inter-token latency) in seconds.",
                               ["model_name"], buckets=TPOT_BUCKETS, registry=self.registry)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end-to-end request latency in "
                              "seconds.", ["model_name"], buckets=E2E_BUCKETS, registry=self.registry)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.time_to_first_token = self._ttft.labels(**label)
        self.time_per_output_token = self._tpot.labels(**label)
        self.e2e_latency = self._e2e.labels(**label)
        self.registry.register(_EngineStatsCollector(get_stats, model_name, get_lora_info))
        ProcessCollector(registry=self.registry)

    def request_finished(self, output: Any, latency_s: float) -> None:
        """Count a finished engine request (one per choice) and its end-to-end latency."""
        self.e2e_latency.observe(latency_s)
        for completion in output.outputs:
            reason = completion.finish_reason or "unknown"
            if reason != "abort":
                self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
