"""llama.cpp's W2 on a GGUF file: one 128-token prompt (ids 100-9999), then 128 greedy tokens one at a time from an
empty cache, never stopping early; decode tok/s over the tokens after the first.

Run with an interpreter that has llama-cpp-python: ``python docs/plots/peers/llamacpp_w2.py --model FILE``.
"""

import argparse
import json
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_ctx=1024, verbose=False)
    decode, e2e = [], []
    for i in range(args.num_iters + 1):  # the first is a warm-up
        rng = random.Random(i)
        prompt = [rng.randrange(100, 10000) for _ in range(args.input_len)]
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        first = time.perf_counter()
        for _ in range(args.output_len - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        end = time.perf_counter()
        if i:
            decode.append((args.output_len - 1) / (end - first))
            e2e.append(args.output_len / (end - start))
    result = {"engine": "llama.cpp", "decode_tok_s": decode, "e2e_tok_s": e2e,
              "median_decode_tok_s": sorted(decode)[len(decode) // 2]}
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
