"""``pagoda bench throughput|latency|serve|step-overhead|ops|spec-decode``: benchmarks with ``vllm bench``'s flags.

The benchmark modules (``pagoda.benchmarks.*``) are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "throughput": ("pagoda.benchmarks.throughput", "offline throughput of one LLM.generate over random prompts"),
    "latency": ("pagoda.benchmarks.latency", "latency, time to first token and decode speed of one batch"),
    "serve": ("pagoda.benchmarks.serve", "load a running OpenAI-compatible server and report its speed"),
    "step-overhead": ("pagoda.benchmarks.profile_step",
                      "per-step engine time besides the model, at a given number of running requests"),
    "ops": ("pagoda.benchmarks.ops", "each chosen op implementation at the W1 and W2 shapes, against the ceilings"),
    "spec-decode": ("pagoda.benchmarks.spec_decode",
                    "single-stream speed with and without --speculative-config on an input-grounded workload"),
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark throughput, latency or a running server",
                                   description="Benchmarks that accept vLLM's `vllm bench` flags.")
    bench_subparsers = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = bench_subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_cli_args(sub)
        sub.set_defaults(func=_runner(module_name))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser


def _runner(module_name: str):
    def run(args: argparse.Namespace) -> int:
        importlib.import_module(module_name).main(args)
        return 0

    return run
