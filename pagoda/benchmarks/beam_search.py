"""Beam search against greedy decoding of as many sequences, and against transformers' beam search.

``python -m pagoda.benchmarks.beam_search --model DIR --num-prompts 4 --beam-width 4 --input-len 64
--output-len 64`` times ``LLM.beam_search`` on random prompts (EOS ignored, so every beam is ``--output-len``
tokens) and, on the same engine, greedy ``LLM.generate`` of ``num_prompts × beam_width`` sequences of the same
length: the ratio is what the search costs on top of decoding its beams (ranking, forks, copy-on-write).
``--hf`` adds transformers' ``generate(num_beams=...)`` on the same prompts, one prompt at a time. The median of
``--num-iters`` timed runs is reported, after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pagoda.benchmarks.common import write_json
from pagoda.benchmarks.datasets import random_requests


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    from pagoda.core.engine_args import EngineArgs

    parser = argparse.ArgumentParser(prog="python -m pagoda.benchmarks.beam_search", description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-iters", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--hf", action="store_true", help="also time transformers' beam search")
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    from pagoda.benchmarks.common import greedy_params, make_llm
    from pagoda.sampling_params import BeamSearchParams

    llm = make_llm(args)
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = [r.prompt_token_ids for r in random_requests(args.num_prompts, args.input_len, 1, vocab_size=vocab,
                                                           seed=args.seed or 0)]
    beam_params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.output_len, ignore_eos=True)
    greedy = greedy_params(args.output_len, detokenize=False)
    greedy_prompts = [{"prompt_token_ids": p} for p in prompts for _ in range(args.beam_width)]

    def beam() -> None:
        llm.beam_search([{"prompt_token_ids": p} for p in prompts], beam_params)

    def plain() -> None:
        llm.generate(greedy_prompts, greedy, use_tqdm=False)

    beam(), plain()  # warm-up
    beam_times = [_timed(beam) for _ in range(args.num_iters)]
    greedy_times = [_timed(plain) for _ in range(args.num_iters)]
    tokens = args.num_prompts * args.beam_width * args.output_len
    beam_s, greedy_s = statistics.median(beam_times), statistics.median(greedy_times)
    result = {"num_prompts": args.num_prompts, "beam_width": args.beam_width, "input_len": args.input_len,
              "output_len": args.output_len, "beam_search_s": beam_s, "all_beam_search_s": beam_times,
              "greedy_same_sequences_s": greedy_s, "beam_tokens_per_second": tokens / beam_s,
              "beam_over_greedy": beam_s / greedy_s}
    print(f"beam search: {beam_s:.3f} s ({tokens / beam_s:.1f} beam tokens/s); greedy decoding of the same "
          f"{args.num_prompts * args.beam_width} sequences: {greedy_s:.3f} s; ratio {beam_s / greedy_s:.2f}")
    if args.hf:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(llm.llm_engine.model_config.path,
                                                     dtype=llm.llm_engine.model_config.dtype).eval()

        def hf() -> None:
            with torch.inference_mode():
                for p in prompts:
                    ids = torch.tensor([p])
                    model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=args.beam_width,
                                   do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                   pad_token_id=0)

        hf()
        hf_s = statistics.median(_timed(hf) for _ in range(args.num_iters))
        result.update(transformers_beam_search_s=hf_s, speedup_over_transformers=hf_s / beam_s)
        print(f"transformers beam search: {hf_s:.3f} s; pagoda is {hf_s / beam_s:.2f}x as fast")
    write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
