"""vLLM's greedy W1: one ``generate`` of 64 fresh 128-token prompts (ids 100-9999), 128 output tokens each,
``temperature=0``, ``ignore_eos`` — the same prompts-in-one-call shape as ``pagoda bench throughput``.

Run with vLLM's own interpreter: ``python docs/plots/peers/vllm_w1.py --model DIR --output-json w1.json``.
"""

import argparse
import json
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=2048, seed=0,
              load_format=args.load_format)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def prompts(seed: int):
        rng = random.Random(seed)
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, 10000) for _ in range(args.input_len)])
                for _ in range(args.num_prompts)]

    llm.generate(prompts(999)[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    times = []
    for i in range(args.num_iters):
        batch = prompts(i)
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    tokens = args.num_prompts * args.output_len
    result = {"engine": "vllm", "runs_s": times, "output_tok_s": [tokens / t for t in times],
              "median_output_tok_s": tokens / sorted(times)[len(times) // 2]}
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
