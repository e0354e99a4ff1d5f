"""AQLM 1x16 (one book of 65536 float16 entries) against dense bf16, ms per pass over the weights.

Usage: python aqlm_1x16.py large    # Llama-2-7B's shapes, two of each, rows 1 / 8 / 64, one call per figure
       python aqlm_1x16.py smollm2  # SmolLM2-135M's four projections over 8 layers, rows 1 / 4 / 16 / 64, mean of 2
"""
import statistics as st
import sys
import time

import torch
import torch.nn.functional as F

from pagoda.benchmarks.ops import LINEARS
from pagoda.ops import select_ops
from pagoda.platforms import resolve_platform

large = sys.argv[1] == "large"
torch.manual_seed(0)
ops = select_ops(resolve_platform(), torch.bfloat16)
cb, dense = ops.linear_codebook, ops.linear_dense
shapes = [(4096, 4096), (11008, 4096), (4096, 11008)] * 2 if large else [v for _ in range(8) for v in LINEARS.values()]


def w16(n, k):
    codes = torch.randint(-32768, 32768, (n, k // 8, 1))
    return cb.prepare(codes, (torch.randn(1, 65536, 1, 8) / k ** .5).half(), torch.rand(n) + 0.5)


h16 = [(w16(n, k), k) for n, k in shapes]
dh = [(dense.prepare((torch.randn(n, k) / k ** .5).bfloat16(), None), k) for n, k in shapes]
tw = [((torch.randn(n, k) / k ** .5).bfloat16(), k) for n, k in shapes]
calls = 1 if large else 2
for m in (1, 8, 64) if large else (1, 4, 16, 64):
    xs = {k: torch.randn(m, k).bfloat16() for k in {k for _, k in shapes}}
    runs = {"aqlm1x16": lambda: [cb.apply(h, xs[k]) for h, k in h16],
            "packed": lambda: [dense.apply(h, xs[k]) for h, k in dh],
            "torch": lambda: [F.linear(xs[k], w) for w, k in tw]}
    res = {k: [] for k in runs}
    for _ in range(5):
        for name, fn in runs.items():
            fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            res[name].append((time.perf_counter() - t) / calls * 1e3)
    md = {k: st.median(v) for k, v in res.items()}
    print(f"m={m:3d} 1x16 {md['aqlm1x16']:.2f} ms packed {md['packed']:.2f} torch {md['torch']:.2f} | "
          f"vs torch {md['torch'] / md['aqlm1x16']:.2f}x vs packed {md['packed'] / md['aqlm1x16']:.2f}x", flush=True)
