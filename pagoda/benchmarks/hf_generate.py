"""The transformers baseline of W1/W2: ``generate`` on the same random prompts, timed the same way.

``python -m pagoda.benchmarks.hf_generate --model DIR --dtype bfloat16 --batch-size 1 --input-len 128
--output-len 128`` runs greedy ``generate`` with exactly ``--output-len`` new tokens (EOS ignored), after one
warm-up call; it reports output tokens/s of the whole call and, from a second call producing one token, the
time to first token and the decode speed after it. ``--batch-size 64`` is W1 (one padded batch, as
``generate`` does it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pagoda.benchmarks.common import write_json
from pagoda.benchmarks.datasets import random_requests

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _generate(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens, "generate stopped early"
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pagoda.benchmarks.hf_generate", description=__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    vocab = model.config.vocab_size

    def batch(i: int) -> torch.Tensor:
        requests = random_requests(args.batch_size, args.input_len, 1, vocab_size=vocab, seed=args.seed + i)
        return torch.tensor([r.prompt_token_ids for r in requests])

    _generate(model, batch(10_000), 4)  # warm-up
    totals, firsts = [], []
    for i in range(args.num_iters):
        ids = batch(i)
        firsts.append(_generate(model, ids, 1))
        totals.append(_generate(model, ids, args.output_len))
    total, first = statistics.median(totals), statistics.median(firsts)
    out_tokens = args.batch_size * args.output_len
    result = {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "elapsed_time": total, "all_elapsed_times": totals,
              "output_tokens_per_second": out_tokens / total,
              "total_tokens_per_second": args.batch_size * (args.input_len + args.output_len) / total,
              "ttft": first,
              "decode_tokens_per_second": args.batch_size * (args.output_len - 1) / max(total - first, 1e-9)}
    print(f"transformers generate ({args.dtype}, batch {args.batch_size}): {result['output_tokens_per_second']:.2f} "
          f"output tokens/s, {result['total_tokens_per_second']:.2f} total tokens/s, TTFT {first * 1000:.1f} ms, "
          f"decode {result['decode_tokens_per_second']:.2f} tokens/s")
    write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
