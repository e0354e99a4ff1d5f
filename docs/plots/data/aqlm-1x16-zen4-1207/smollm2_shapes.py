import time, statistics as st, torch, torch.nn.functional as F
from pagoda.ops import select_ops
from pagoda.platforms import resolve_platform
from pagoda.benchmarks.ops import LINEARS
ops = select_ops(resolve_platform(), torch.bfloat16)
cb, dense = ops.linear_codebook, ops.linear_dense
L = 8
shapes = [v for _ in range(L) for v in LINEARS.values()]
def w16(n, k):
    codes = torch.randint(-32768, 32768, (n, k // 8, 1))
    return cb.prepare(codes, (torch.randn(1, 65536, 1, 8) / k ** .5).half(), torch.rand(n) + 0.5)
h16 = [(w16(n, k), k) for n, k in shapes]
print(type(h16[0][0]).__name__)
dh = [(dense.prepare((torch.randn(n, k) / k ** .5).bfloat16(), None), k) for n, k in shapes]
tw = [((torch.randn(n, k) / k ** .5).bfloat16(), k) for n, k in shapes]
for m in (1, 4, 16, 64):
    xs = {k: torch.randn(m, k).bfloat16() for k in {k for _, k in shapes}}
    runs = {"aqlm1x16": lambda: [cb.apply(h, xs[k]) for h, k in h16], "packed": lambda: [dense.apply(h, xs[k]) for h, k in dh],
            "torch": lambda: [F.linear(xs[k], w) for w, k in tw]}
    res = {k: [] for k in runs}
    for _ in range(5):
        for name, fn in runs.items():
            fn(); t = time.perf_counter(); fn(); fn(); res[name].append((time.perf_counter() - t) / 2 * 1e3)
    md = {k: st.median(v) for k, v in res.items()}
    print(f"m={m:3d} 1x16 {md['aqlm1x16']:.2f} ms packed {md['packed']:.2f} torch {md['torch']:.2f} | "
          f"vs torch {md['torch']/md['aqlm1x16']:.2f}x vs packed {md['packed']/md['aqlm1x16']:.2f}x", flush=True)
