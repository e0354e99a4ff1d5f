"""``pagoda bench serve``: load a running OpenAI-compatible server (pagoda's or vLLM's) and measure it.

Requests are streamed completions (``/v1/completions``) whose prompts are the random dataset's token ids, so the
server sees exactly ``--random-input-len`` tokens whatever its tokenizer. Each request asks for exactly its output
length (``ignore_eos``, vLLM's extension) and for usage in the final chunk, which gives the output token count
(without usage, chunks are counted, or the text is tokenized when ``--tokenizer`` is given). Arrivals follow a
Poisson process of ``--request-rate`` requests/s (``inf``: all at once), at most ``--max-concurrency`` in flight.

Per request: TTFT is the time to the first streamed chunk; TPOT is ``(latency - TTFT) / (output tokens - 1)``;
ITLs are the gaps between consecutive chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from pagoda import envs
from pagoda.benchmarks.common import summarize, write_json
from pagoda.benchmarks.datasets import BenchRequest, add_dataset_args, requests_from_args

ENDPOINTS = ("/v1/completions",)


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="openai", choices=("openai", "vllm", "pagoda"),
                        help="server kind; all speak the OpenAI completions API")
    parser.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000 (else host/port)")
    parser.add_argument("--host", default="127.0.0.1", help="server host")
    parser.add_argument("--port", type=int, default=8000, help="server port")
    parser.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS, help="API route")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--served-model-name", default=None, help="alias of --model")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="LoRA adapter names the server serves: each request names one of them, chosen at "
                             "random (seeded by --seed), instead of --model")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to count output tokens when the server sends no usage")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: "
                        "$OPENAI_API_KEY)")
    add_dataset_args(parser, default_num_prompts=1000)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the inter-arrival times (1: Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--ignore-eos", action="store_true", help="generate every request's full output length")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and arrival-time seed")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--request-timeout", type=float, default=6 * 3600, help="seconds before a request fails")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")


def _url(args: argparse.Namespace, path: str) -> str:
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return base + path


async def _first_model(session, args: argparse.Namespace) -> str:
    async with session.get(_url(args, "/v1/models")) as response:
        if response.status != 200:
            raise RuntimeError(f"GET /v1/models answered {response.status}: {await response.text()}")
        models = (await response.json()).get("data") or []
    if not models:
        raise RuntimeError("the server lists no model; give --model")
    return models[0]["id"]


async def _send(session, url: str, payload: dict, request: BenchRequest, tokenizer) -> RequestResult:
    """One streamed completion, timed chunk by chunk."""
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    text, chunks, usage_tokens = [], 0, None
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                body = json.loads(data)
                if body.get("usage"):
                    usage_tokens = body["usage"].get("completion_tokens")
                if not body.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
                text.append(body["choices"][0].get("text") or "")
        result.latency = time.perf_counter() - start
    except Exception as exc:  # a failed request is reported, not fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if usage_tokens is not None:
        result.output_tokens = int(usage_tokens)
    elif tokenizer is not None:
        result.output_tokens = len(tokenizer.encode("".join(text), add_special_tokens=False))
    else:
        result.output_tokens = chunks
    result.success = chunks > 0
    if not result.success:
        result.error = "the stream held no completion chunk"
    return result


async def _arrivals(count: int, rate: float, burstiness: float, seed: int):
    """Yield request indices at Poisson (gamma for burstiness != 1) arrival times."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        yield index
        if rate != float("inf") and index + 1 < count:
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


async def benchmark(args: argparse.Namespace, requests: list[BenchRequest], tokenizer=None) -> dict:
    """Send ``requests`` as the flags say and return the metrics (also printed)."""
    try:
        import aiohttp
    except ModuleNotFoundError:
        raise RuntimeError("pagoda bench serve needs aiohttp: pip install 'pagoda-llm[bench]'") from None

    headers = {}
    api_key = args.api_key
    if api_key is None:
        api_key = envs.openai_api_key()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector,
                                     read_bufsize=1 << 20) as session:
        model = args.model or args.served_model_name or await _first_model(session, args)
        url = _url(args, args.endpoint)

        # vLLM's: with --lora-modules, each request's model is one of the adapters, drawn at random
        adapters = args.lora_modules or []
        draws = np.random.default_rng(args.seed + 1).integers(len(adapters), size=len(requests)) if adapters else []
        adapter_of = {id(request): adapters[draw] for request, draw in zip(requests, draws)}

        def payload(request: BenchRequest) -> dict:
            return {"model": adapter_of.get(id(request), model), "prompt": request.prompt_token_ids,
                    "max_tokens": request.output_len,
                    "temperature": args.temperature, "ignore_eos": args.ignore_eos, "stream": True,
                    "stream_options": {"include_usage": True}}

        # A test request first: a bad URL or model fails fast instead of as N failed requests.
        probe = await _send(session, url, {**payload(requests[0]), "max_tokens": 2}, requests[0], tokenizer)
        if not probe.success:
            raise RuntimeError(f"the test request to {url} failed: {probe.error}")
        print(f"Traffic request rate: {args.request_rate}, burstiness: {args.burstiness}, "
              f"max concurrency: {args.max_concurrency}")
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = None
        if not args.disable_tqdm:
            from tqdm.asyncio import tqdm
            bar = tqdm(total=len(requests))

        async def run(request: BenchRequest) -> RequestResult:
            if semaphore is None:
                result = await _send(session, url, payload(request), request, tokenizer)
            else:
                async with semaphore:
                    result = await _send(session, url, payload(request), request, tokenizer)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        async for index in _arrivals(len(requests), args.request_rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(run(requests[index])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return report(args, model, results, duration)


def report(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    """vLLM's serving summary: throughputs and TTFT / TPOT / ITL statistics in milliseconds."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    stats = {"ttft": summarize([r.ttft for r in ok]), "tpot": summarize(tpots), "itl": summarize(itls),
             "e2el": summarize([r.latency for r in ok])}
    out = {
        "model_id": model, "num_prompts": len(results),
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency, "duration": duration, "completed": len(ok),
        "failed": len(results) - len(ok), "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "errors": sorted({r.error for r in results if r.error})[:10],
    }
    for metric, values in stats.items():
        for stat, value in values.items():
            out[f"{stat}_{metric}_ms"] = value
    line = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(line("Successful requests:", len(ok)))
    print(line("Failed requests:", out["failed"]))
    if args.max_concurrency is not None:
        print(line("Maximum request concurrency:", args.max_concurrency))
    print(num("Benchmark duration (s):", duration))
    print(line("Total input tokens:", input_tokens))
    print(line("Total generated tokens:", output_tokens))
    print(num("Request throughput (req/s):", out["request_throughput"]))
    print(num("Output token throughput (tok/s):", out["output_throughput"]))
    print(num("Total Token throughput (tok/s):", out["total_token_throughput"]))
    for metric, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                          ("itl", "Inter-token Latency")):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        upper = metric.upper()
        print(num(f"Mean {upper} (ms):", out[f"mean_{metric}_ms"]))
        print(num(f"Median {upper} (ms):", out[f"median_{metric}_ms"]))
        print(num(f"P99 {upper} (ms):", out[f"p99_{metric}_ms"]))
    print("=" * 50)
    if out["errors"]:
        print("Errors:", *out["errors"], sep="\n  ")
    return out


def main(args: argparse.Namespace) -> dict:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {args.max_concurrency}")
    if args.request_rate <= 0:
        raise ValueError(f"request_rate: must be > 0 (or inf), got {args.request_rate}")
    tokenizer = None
    vocab_size = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        vocab_size = len(tokenizer)
    requests = requests_from_args(args, vocab_size)
    result = asyncio.run(benchmark(args, requests, tokenizer))
    write_json(args.output_json, result)
    return result
