"""``pagoda bench latency``: end-to-end latency of one batch, with time to first token and decode speed.

Each iteration sends ``--batch-size`` fresh random prompts of ``--input-len`` tokens (fresh, so the prefix cache
never skips the prefill) and generates exactly ``--output-len`` tokens each. The engine is stepped directly so
the first token's time is seen: TTFT is the time until every request of the batch has its first token, and the
decode speed is the tokens generated after it divided by the time after it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from pagoda.benchmarks.common import PERCENTILES, greedy_params, make_llm, write_json
from pagoda.benchmarks.datasets import random_requests


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from pagoda.core.engine_args import EngineArgs

    parser.add_argument("--input-len", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per batch")
    parser.add_argument("--num-iters-warmup", type=int, default=10, help="untimed iterations first")
    parser.add_argument("--num-iters", type=int, default=30, help="timed iterations")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(parser)


def run_batch(engine, prompts: list[list[int]], params, tag: str) -> tuple[float, float]:
    """Run one batch to completion: ``(latency s, time to the batch's last first token s)``."""
    from pagoda.sampling_params import RequestOutputKind

    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA
    start = time.perf_counter()
    waiting_first = set()
    for i, ids in enumerate(prompts):
        rid = f"{tag}-{i}"
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
        waiting_first.add(rid)
    first_token_time = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if waiting_first:
            for output in outputs:
                if output.outputs and output.outputs[0].token_ids:
                    waiting_first.discard(output.request_id)
            if not waiting_first:
                first_token_time = time.perf_counter() - start
    latency = time.perf_counter() - start
    return latency, first_token_time if first_token_time is not None else latency


def main(args: argparse.Namespace) -> dict:
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"num_iters_warmup: must be >= 0, got {args.num_iters_warmup}")
    llm = make_llm(args)
    engine = llm.llm_engine
    vocab_size = engine.model_config.vocab_size
    params = greedy_params(args.output_len, args.temperature)
    seed = args.seed or 0

    def batch(iteration: int) -> list[list[int]]:
        requests = random_requests(args.batch_size, args.input_len, 1, vocab_size=vocab_size,
                                   seed=seed + 7919 * iteration + 1)
        return [r.prompt_token_ids for r in requests]

    for i in tqdm(range(args.num_iters_warmup), desc="Warmup iterations"):
        run_batch(engine, batch(args.num_iters + i), params, f"warmup{i}")
    latencies, ttfts = [], []
    for i in tqdm(range(args.num_iters), desc="Profiling iterations"):
        latency, ttft = run_batch(engine, batch(i), params, f"iter{i}")
        latencies.append(latency)
        ttfts.append(ttft)
    lat = np.array(latencies)
    ttft = np.array(ttfts)
    decode_tokens = args.batch_size * (args.output_len - 1)
    decode_speed = decode_tokens / np.maximum(lat - ttft, 1e-9) if args.output_len > 1 else np.zeros_like(lat)
    percentiles = {str(p): float(np.percentile(lat, p)) for p in PERCENTILES}
    result = {
        "avg_latency": float(lat.mean()), "latencies": latencies, "percentiles": percentiles,
        "avg_ttft": float(ttft.mean()), "median_ttft": float(np.median(ttft)), "ttfts": ttfts,
        "median_decode_tokens_per_second": float(np.median(decode_speed)),
        "median_output_tokens_per_second": float(np.median(args.batch_size * args.output_len / lat)),
        "input_len": args.input_len, "output_len": args.output_len, "batch_size": args.batch_size,
    }
    print(f"Avg latency: {result['avg_latency']:.4f} seconds")
    for p, value in percentiles.items():
        print(f"{p}% percentile latency: {value:.4f} seconds")
    print(f"Avg time to first token: {result['avg_ttft'] * 1000:.2f} ms (median {result['median_ttft'] * 1000:.2f} ms)")
    print(f"Decode throughput (median): {result['median_decode_tokens_per_second']:.2f} tokens/s "
          f"({result['median_decode_tokens_per_second'] / args.batch_size:.2f} tokens/s per request)")
    write_json(args.output_json, result)
    return result
