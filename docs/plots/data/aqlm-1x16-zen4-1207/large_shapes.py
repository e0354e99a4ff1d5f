import time, statistics as st, torch, sys, torch.nn.functional as F
from pagoda.ops import select_ops
from pagoda.platforms import resolve_platform
torch.manual_seed(0)
ops = select_ops(resolve_platform(), torch.bfloat16)
cb, dense = ops.linear_codebook, ops.linear_dense
shapes = [(4096, 4096), (11008, 4096), (4096, 11008)] * 2
def w16(n, k):
    codes = torch.randint(-32768, 32768, (n, k // 8, 1))
    return cb.prepare(codes, (torch.randn(1, 65536, 1, 8) / k ** .5).half(), torch.rand(n) + 0.5)
h16 = [(w16(n, k), k) for n, k in shapes]
dh = [(dense.prepare((torch.randn(n, k) / k ** .5).bfloat16(), None), k) for n, k in shapes]
tw = [((torch.randn(n, k) / k ** .5).bfloat16(), k) for n, k in shapes]
for m in (1, 8, 64):
    xs = {k: torch.randn(m, k).bfloat16() for k in {k for _, k in shapes}}
    runs = {"aqlm1x16": lambda: [cb.apply(h, xs[k]) for h, k in h16], "packed": lambda: [dense.apply(h, xs[k]) for h, k in dh],
            "torch": lambda: [F.linear(xs[k], w) for w, k in tw]}
    res = {k: [] for k in runs}
    for _ in range(5):
        for name, fn in runs.items():
            fn(); t = time.perf_counter(); fn(); res[name].append((time.perf_counter() - t) * 1e3)
    md = {k: st.median(v) for k, v in res.items()}
    print(f"{sys.argv[1]} m={m:3d} 1x16 {md['aqlm1x16']:.1f} ms packed {md['packed']:.1f} torch {md['torch']:.1f} | "
          f"vs torch {md['torch']/md['aqlm1x16']:.2f}x vs packed {md['packed']/md['aqlm1x16']:.2f}x", flush=True)
