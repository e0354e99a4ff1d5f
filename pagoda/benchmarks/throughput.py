"""``pagoda bench throughput``: offline throughput of one ``LLM.generate`` call over a random dataset.

The model is loaded and warmed up (a few short requests of other random prompts) before the timed call, so the
figure is steady-state generation. Every request produces exactly its output length (``ignore_eos``). With
``--num-iters N`` the timed call runs N times on fresh prompts (no prefix-cache hits) and the median is reported.
``--structured-output-ratio`` constrains that share of the requests by a JSON schema (see ``structured.py``);
``--lora-path`` / ``--num-loras`` spread the requests over LoRA adapters (see ``lora.py``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pagoda.benchmarks.common import greedy_params, make_llm, write_json
from pagoda.benchmarks.datasets import add_dataset_args, random_requests, requests_from_args
from pagoda.benchmarks.lora import add_cli_args as add_lora_args
from pagoda.benchmarks.lora import lora_requests, prepare_args
from pagoda.benchmarks.structured import add_cli_args as add_structured_args
from pagoda.benchmarks.structured import constrain, num_constrained, schema_from_args


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from pagoda.core.engine_args import EngineArgs

    parser.add_argument("--input-len", type=int, default=None, help="prompt length (overrides --random-input-len)")
    parser.add_argument("--output-len", type=int, default=None,
                        help="tokens generated per request (overrides --random-output-len)")
    add_dataset_args(parser, default_num_prompts=1000)
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--disable-detokenize", action="store_true", help="do not detokenize the outputs")
    parser.add_argument("--num-iters", type=int, default=1, help="timed runs (the median is reported)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up requests")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    add_structured_args(parser)
    add_lora_args(parser)
    EngineArgs.add_cli_args(parser)


def run_once(llm, requests, params_for, constrain_params=None, finished: list | None = None,
             loras: list | None = None) -> tuple[float, int, int]:
    """Time one ``generate`` over ``requests``: ``(seconds, prompt tokens, output tokens)``. ``constrain_params``
    may turn some of the parameters into constrained ones; ``finished`` receives the outputs."""
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [params_for(r.output_len) for r in requests]
    if constrain_params is not None:
        params = constrain_params(params)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True, lora_request=loras)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    if finished is not None:
        finished.extend(outputs)
    return elapsed, prompt_tokens, output_tokens


def warm_up(llm, vocab_size: int, seed: int, constrain_params=None, num: int = 4) -> None:
    """A few short requests so that first-call costs (allocation, kernel selection, compiling the structured-output
    schema) stay out of the timing."""
    requests = random_requests(num, 32, 4, vocab_size=vocab_size, seed=seed + 104729)
    params = [greedy_params(4)] * num
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 constrain_params(params) if constrain_params is not None else params, use_tqdm=False)


def main(args: argparse.Namespace) -> dict:
    if args.num_iters < 1:
        raise ValueError(f"num_iters: must be >= 1, got {args.num_iters}")
    schema = schema_from_args(args)
    prepare_args(args)
    llm = make_llm(args)
    vocab_size = llm.llm_engine.model_config.vocab_size

    def constrain_params(params):
        return constrain(params, schema, args.structured_output_ratio)

    if args.warmup:
        warm_up(llm, vocab_size, args.seed or 0, constrain_params)

    def params_for(output_len: int):
        return greedy_params(output_len, args.temperature, not args.disable_detokenize)

    loras = lora_requests(llm, args, args.num_prompts)  # adapters read into host memory before the timing
    runs, outputs = [], []
    for i in range(args.num_iters):
        requests = requests_from_args(args, vocab_size, seed_offset=i)
        runs.append(run_once(llm, requests, params_for, constrain_params, outputs if i == 0 else None,
                             loras))
    elapsed = [r[0] for r in runs]
    median = int(np.argsort(elapsed)[len(elapsed) // 2])
    seconds, prompt_tokens, output_tokens = runs[median]
    total = prompt_tokens + output_tokens
    result = {
        "elapsed_time": seconds, "num_requests": args.num_prompts, "total_num_tokens": total,
        "num_prompt_tokens": prompt_tokens, "num_output_tokens": output_tokens,
        "requests_per_second": args.num_prompts / seconds, "tokens_per_second": total / seconds,
        "output_tokens_per_second": output_tokens / seconds, "all_elapsed_times": elapsed,
    }
    if args.lora_path or args.num_loras:
        result["num_loras"] = args.num_loras or args.max_loras
    if schema is not None:
        result["structured_output_ratio"] = args.structured_output_ratio
        result["num_constrained"] = num_constrained(len(requests), args.structured_output_ratio)
        # Unconstrained requests ignore EOS; a constrained one stops where its JSON ends (first run).
        result["num_constrained_stopped"] = sum(o.outputs[0].finish_reason == "stop" for o in outputs)
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} total "
          f"tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {prompt_tokens}")
    print(f"Total num output tokens:  {output_tokens}")
    if args.num_iters > 1:
        print(f"Elapsed per run (s): {', '.join(f'{e:.2f}' for e in elapsed)} (median reported)")
    write_json(args.output_json, result)
    return result
