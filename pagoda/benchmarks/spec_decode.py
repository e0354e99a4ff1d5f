"""``pagoda bench spec-decode``: single-stream decode speed with and without ``--speculative-config`` on the
input-grounded dataset ("reproduce this passage with a small edit", see ``grounded.py``).

Two engines are built from the same flags, one with the speculative config and one without. Each iteration
runs one request through each, alternating which goes first so drift in the machine's speed affects both
alike, and the greedy outputs are compared (speculation must not change them). Reported: median output tokens/s
(whole request) and decode tokens/s (after the first token) of each, the speed-ups, and the acceptance rate and
mean accepted length.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from tqdm import tqdm

from pagoda.benchmarks.common import greedy_params, write_json
from pagoda.benchmarks.grounded import grounded_prompts
from pagoda.benchmarks.latency import run_batch
from pagoda.sampling_params import RequestOutputKind


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from pagoda.core.engine_args import EngineArgs

    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--num-iters", type=int, default=6, help="timed iterations (one request per engine each)")
    parser.add_argument("--dataset", default="grounded", choices=("grounded",),
                        help="grounded: a passage to reproduce with a small edit")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(parser)


def main(args: argparse.Namespace) -> dict:
    from pagoda.core.engine_args import EngineArgs
    from pagoda.entrypoints.llm import LLM

    for name in ("output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.speculative_config is None:
        raise ValueError("speculative_config: bench spec-decode compares a speculative config with plain "
                         "decoding; pass --speculative-config '{\"method\": \"ngram\", ...}'")
    engines = {"baseline": LLM(**vars(dataclasses.replace(engine_args, speculative_config=None))).llm_engine,
               "speculative": LLM(**vars(engine_args)).llm_engine}
    spec_engine = engines["speculative"]
    prompts = grounded_prompts(spec_engine.tokenizer, 3,
                               spec_engine.model_config.vocab_size, args.seed or 0)
    params = greedy_params(args.output_len)
    for i in tqdm(range(args.num_iters_warmup), desc="Warmup iterations"):
        for name, engine in engines.items():
            run_batch(engine, [prompts[i % len(prompts)]], params, f"warmup-{name}-{i}")
    spec_engine.runner.spec.reset_stats()  # count the timed iterations only
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    for i in tqdm(range(args.num_iters), desc="Interleaved iterations"):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            prompt = prompts[i % len(prompts)]
            times[name].append(_timed(engine, prompt, params, f"{name}-{i}", outputs[name]))
    result: dict = {"output_len": args.output_len, "num_iters": args.num_iters, "dataset": args.dataset,
                    "speculative_config": engine_args.speculative_config}
    for name, values in times.items():
        latency = np.array([v[0] for v in values])
        ttft = np.array([v[1] for v in values])
        result[f"{name}_output_tokens_per_second"] = float(np.median(args.output_len / latency))
        decode = (args.output_len - 1) / np.maximum(latency - ttft, 1e-9)
        result[f"{name}_decode_tokens_per_second"] = float(np.median(decode))
    result["output_speedup"] = result["speculative_output_tokens_per_second"] / result[
        "baseline_output_tokens_per_second"]
    result["decode_speedup"] = result["speculative_decode_tokens_per_second"] / result[
        "baseline_decode_tokens_per_second"]
    result["outputs_identical"] = outputs["baseline"] == outputs["speculative"]
    stats = spec_engine.get_stats().spec_decoding
    result.update(acceptance_rate=stats.acceptance_rate, mean_acceptance_length=stats.mean_acceptance_length,
                  num_drafts=stats.num_drafts, num_draft_tokens=stats.num_draft_tokens,
                  num_accepted_tokens=stats.num_accepted_tokens)
    for name in engines:
        print(f"{name}: {result[f'{name}_output_tokens_per_second']:.2f} output tokens/s, "
              f"{result[f'{name}_decode_tokens_per_second']:.2f} decode tokens/s (median)")
    print(f"Speed-up: {result['output_speedup']:.2f}x output, {result['decode_speedup']:.2f}x decode; "
          f"outputs identical: {result['outputs_identical']}")
    print(stats.summary())
    write_json(args.output_json, result)
    return result


def _timed(engine, prompt: list[int], params, tag: str, outputs: list[list[int]]) -> tuple[float, float]:
    """One request through ``engine``: ``(latency s, time to first token s)``; its tokens go to ``outputs``."""
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    start = time.perf_counter()
    engine.add_request(tag, {"prompt_token_ids": prompt}, params)
    first = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = list(output.outputs[0].token_ids)
        if first is None and engine.scheduler.requests.get(tag) is not None and \
                engine.scheduler.requests[tag].output_token_ids:
            first = time.perf_counter() - start
    latency = time.perf_counter() - start
    outputs.append(tokens)
    return latency, first if first is not None else latency
