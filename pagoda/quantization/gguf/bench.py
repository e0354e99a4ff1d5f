"""Per-matmul timings of the GGUF kernels vs a dense bf16 ``F.linear``.

    python -m pagoda.quantization.gguf.bench [--threads N] [--repeat R]

Shapes are SmolLM2-135M's (hidden 576, FFN 1536, 3 KV heads of 64, vocab 49152) at decode (batch 1) and
prefill (batch 128) sizes; weights are random blocks of each type. Prints the median of ``repeat`` runs of
CPU time (``--clock cpu``, the default: robust on a shared machine, exact for one thread) or wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from pagoda.quantization.gguf.kernels import make_kernel

SHAPES = [(576, 1536, T.Q4_1), (1536, 576, T.Q4_1), (576, 576, T.Q4_1), (576, 192, T.Q4_1),
          (576, 49152, T.Q8_0), (576, 1536, T.Q4_0), (576, 1536, T.Q8_0),
          # K-quant super-blocks are 256 wide: 576 is not a multiple, so these use K = 768
          (768, 1536, T.Q4_K), (768, 1536, T.Q6_K), (768, 1536, T.Q5_K)]


def _random_raw(qtype: T, n: int, k: int) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    # keep every fp16 scale finite and small, wherever the layout puts it
    fp16 = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]
    for off in fp16:
        raw[:, off:off + 2] = rng.uniform(1e-3, 1e-2, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def _median_ms(fn, repeat: int, clock) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads; median {args.clock} ms of {args.repeat} runs")
    print(f"{'K→N':>10} {'type':>5} {'batch':>5} | {'gguf bf16':>9} {'gguf f32':>9} | {'dense bf16':>10}")
    with torch.inference_mode():
        for k, n, qtype in SHAPES:
            raw = _random_raw(qtype, n, k)
            kernel = make_kernel(raw, qtype, (n, k), torch.bfloat16)
            kernel32 = make_kernel(raw, qtype, (n, k), torch.float32)
            dense = torch.randn(n, k, dtype=torch.bfloat16)
            for batch in (1, 128):
                x32 = torch.randn(batch, k)
                x16 = x32.to(torch.bfloat16)
                t16 = _median_ms(lambda: kernel.matmul(x16), args.repeat, clock)
                t32 = _median_ms(lambda: kernel32.matmul(x32), args.repeat, clock)
                td = _median_ms(lambda: F.linear(x16, dense), args.repeat, clock)
                print(f"{k:>4}→{n:<5} {qtype.name:>5} {batch:>5} | {t16:9.3f} {t32:9.3f} | {td:10.3f}  "
                      f"({type(kernel).__name__} / {type(kernel32).__name__})")


if __name__ == "__main__":
    main()
