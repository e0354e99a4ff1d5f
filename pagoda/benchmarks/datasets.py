"""The random dataset of the benchmarks: prompts of random token ids, as ``--dataset-name random`` in vLLM.

Token ids are drawn uniformly from ``[100, 10000)`` (clipped to the vocabulary): ordinary vocabulary entries,
away from the special tokens at the start of most vocabularies. Lengths are drawn uniformly from
``[len * (1 - ratio), len * (1 + ratio)]`` when ``--random-range-ratio`` is above 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

DATASET_NAMES = ("random",)
TOKEN_ID_LOW = 100
TOKEN_ID_HIGH = 10000


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: its prompt as token ids and the number of tokens it must generate."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _lengths(rng: np.random.Generator, length: int, ratio: float, count: int, name: str) -> np.ndarray:
    if length < 1:
        raise ValueError(f"{name}: must be >= 1, got {length}")
    if not 0 <= ratio < 1:
        raise ValueError(f"random_range_ratio: must be in [0, 1), got {ratio}")
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=count)


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    vocab_size: int | None = None, seed: int = 0) -> list[BenchRequest]:
    """``num_prompts`` requests of random token ids; the same seed gives the same requests."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    high = TOKEN_ID_HIGH if vocab_size is None else min(TOKEN_ID_HIGH, vocab_size)
    low = min(TOKEN_ID_LOW, high - 1)
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts, "input_len")
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts, "output_len")
    return [BenchRequest(rng.integers(low, high, size=int(n)).tolist(), int(m)) for n, m in zip(in_lens, out_lens)]


def add_dataset_args(parser: argparse.ArgumentParser, default_num_prompts: int) -> None:
    """The dataset flags shared by ``bench throughput`` and ``bench serve`` (vLLM's names)."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", default="random", choices=DATASET_NAMES,
                       help="where prompts come from (random token ids)")
    group.add_argument("--num-prompts", type=int, default=default_num_prompts, help="number of requests")
    group.add_argument("--random-input-len", type=int, default=1024, help="prompt length in tokens")
    group.add_argument("--random-output-len", type=int, default=128, help="tokens to generate per request")
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths vary uniformly within +-ratio of the given lengths")
    group.add_argument("--random-prefix-len", type=int, default=0,
                       help="a shared random prefix of this many tokens before every prompt")


def requests_from_args(args: argparse.Namespace, vocab_size: int | None, seed_offset: int = 0
                       ) -> list[BenchRequest]:
    """Build the dataset from the flags; ``--input-len`` / ``--output-len`` (where a command has them) win over
    the ``--random-*`` lengths, as in vLLM."""
    input_len = getattr(args, "input_len", None) or args.random_input_len
    output_len = getattr(args, "output_len", None) or args.random_output_len
    seed = (args.seed or 0) + seed_offset
    requests = random_requests(args.num_prompts, input_len, output_len, args.random_range_ratio, vocab_size, seed)
    if args.random_prefix_len:
        prefix = random_requests(1, args.random_prefix_len, 1, 0.0, vocab_size, seed + 7919)[0].prompt_token_ids
        requests = [BenchRequest(prefix + r.prompt_token_ids, r.output_len) for r in requests]
    return requests
