import time, torch, statistics as st
from pagoda.platforms.cpu import ops as impls
from pagoda.quantization.int_kernels import affine_kernel
class Old(impls.PackedBlockQuant):
    def accepts_zero(self, i, g, d, bits=4): return bits == 4 and super().accepts_zero(i, g, d, bits)
torch.manual_seed(0)
for (n, k, group) in ((3072, 576, 32), (576, 1536, 128)):
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8); scale = (torch.rand(n, k // group) * .01).half().float()
    zero = torch.randint(-128, 128, (n, k // group)).float()
    kold = affine_kernel(codes, scale, zero, group, 8, torch.bfloat16, Old())
    knew = affine_kernel(codes, scale, zero, group, 8, torch.bfloat16, impls.PackedBlockQuant())
    for m in (1, 8, 64, 2048):
        x = torch.randn(m, k).bfloat16(); reps = 200 if m < 64 else (50 if m == 64 else 5)
        res = {"old": [], "new": []}
        for _ in range(5):
            for name, kern in (("old", kold), ("new", knew)):
                kern.matmul(x); t = time.perf_counter()
                for _ in range(reps): kern.matmul(x)
                res[name].append((time.perf_counter() - t) / reps * 1e3)
        print(f"{n}x{k} g{group} m={m}: old {st.median(res['old']):.3f} ms new {st.median(res['new']):.3f} ms "
              f"({min(res['old']):.3f}/{min(res['new']):.3f})", flush=True)
