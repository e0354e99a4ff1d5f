"""``pagoda bench ops``: each chosen op implementation at the W1 and W2 shapes, against the machine's ceilings.

The op set is the one an engine would choose here (platform ``--device``, dtype ``--dtype``, ``--op-impl``);
``--all-impls`` times every runnable implementation instead. Shapes are SmolLM2-135M's (hidden 576, 9/3 heads of
64, FFN 1536, vocab 49152): W1 is 64 decoding sequences at 192 cached tokens and 16 prompts of 128 tokens per
prefill step, W2 one sequence (``fused_moe``: a small Mixtral's expert block, ``MOE``; ``lora_shrink_expand``: W1's
tokens spread over 8 rank-16 adapters). Linear ops, ``fused_moe`` and ``lora_shrink_expand`` report GFLOP/s (of each
token's own adapter), the rest GB/s of the tensors they must read and write.
The ceilings: torch's bf16 matmul at 2048³ and a read of 512 MiB. ``--layers N`` also times the dense, FP8 and
INT8 linear ops over N layers' distinct weights, one sweep per figure: the weights then come from memory, as in a
model step, where the figures above have them in cache.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from pagoda.benchmarks.common import write_json

HIDDEN, HEADS, KV_HEADS, D, FFN, VOCAB = 576, 9, 3, 64, 1536, 49152
LINEARS = {"qkv": (HEADS * D + 2 * KV_HEADS * D, HIDDEN), "o": (HIDDEN, HEADS * D), "gate_up": (2 * FFN, HIDDEN),
           "down": (HIDDEN, FFN)}
MOE = dict(experts=8, top_k=2, hidden=1024, inter=2048)  # one layer of the benchmarks' small Mixtral-shaped config
# Each projection's shards as the LoRA slots see them (q/k/v and gate/up merged), 8 slots of rank 16.
LORA_SHARDS = {"qkv": [HEADS * D, KV_HEADS * D, KV_HEADS * D], "o": [HIDDEN], "gate_up": [FFN, FFN], "down": [HIDDEN]}
LORA_SLOTS, LORA_RANK = 8, 16


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="platform (default: the resolved one)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--op-impl", default=None, help="forced implementations, as the engine flag")
    parser.add_argument("--all-impls", action="store_true", help="time every runnable implementation of each op")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per figure (median reported)")
    parser.add_argument("--layers", type=int, default=0,
                        help="also time the linear ops over this many layers' weights (SmolLM2-135M has 30)")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")


def _median_s(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _rows(impl, dtype: torch.dtype, iters: int) -> list[dict]:
    """(workload, shape, time, rate) rows for one implementation."""
    op, out = impl.op, []
    esz = torch.finfo(dtype).bits // 8

    def add(workload: str, shape: str, seconds: float, *, flops: float = 0.0, nbytes: float = 0.0) -> None:
        rate = f"{flops / seconds / 1e9:.0f} GFLOP/s" if flops else f"{nbytes / seconds / 1e9:.1f} GB/s"
        out.append({"op": op, "impl": impl.name, "workload": workload, "shape": shape, "ms": seconds * 1e3,
                    "rate": rate})

    if op == "linear_dense":
        for name, (n, k) in {**LINEARS, "lm_head": (VOCAB, HIDDEN)}.items():
            weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
            handle = impl.prepare_lm_head(weight, None) if name == "lm_head" else impl.prepare(weight, None)
            for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
                if name == "lm_head" and m > 64:
                    continue
                x = torch.randn(m, k).to(dtype)
                label, fn = "", (lambda: impl.apply(handle, x))
                if name == "lm_head":  # what a greedy step asks: the argmax, or logits and their argmax without it
                    has_greedy = impl.greedy(handle, x) is not None
                    label = " (greedy)" if has_greedy else " (logits + argmax)"
                    fn = ((lambda: impl.greedy(handle, x)) if has_greedy
                          else (lambda: impl.logits(handle, x).argmax(-1)))
                add(workload, f"{name} {m}x{k}->{n}{label}", _median_s(fn, iters), flops=2.0 * m * n * k)
    elif op == "linear_block_quant":
        for name, (n, k) in LINEARS.items():
            if not impl.accepts(k, dtype):
                continue
            handle = impl.prepare(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32) * 0.01,
                                  torch.randn(n, k // 32) * 0.01, 4)
            for workload, m in (("W2 (Q4)", 1), ("W1 decode (Q4)", 64)):
                x = torch.randn(m, k).to(dtype)
                add(workload, f"{name} {m}x{k}->{n}", _median_s(lambda: impl.apply(handle, x), iters),
                    flops=2.0 * m * n * k)
    elif op in ("rms_norm", "silu_and_mul", "gelu_and_mul"):
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            if op == "rms_norm":
                x, res, w = (torch.randn(m, HIDDEN).to(dtype), torch.randn(m, HIDDEN).to(dtype),
                             torch.ones(HIDDEN, dtype=dtype))
                fn, moved, shape = (lambda: impl(x, w, 1e-5, res)), 4 * m * HIDDEN * esz, f"{m}x{HIDDEN} +residual"
            else:
                x = torch.randn(m, 2 * FFN).to(dtype)
                fn, moved, shape = (lambda: impl(x)), 3 * m * FFN * esz, f"{m}x{2 * FFN}"
            add(workload, shape, _median_s(fn, iters), nbytes=moved)
    elif op in ("layer_norm", "activation"):  # the GPT-style decoders' elementwise ops
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            if op == "layer_norm":
                x, res = torch.randn(m, HIDDEN).to(dtype), torch.randn(m, HIDDEN).to(dtype)
                w, b = torch.ones(HIDDEN, dtype=dtype), torch.zeros(HIDDEN, dtype=dtype)
                fn, moved, shape = (lambda: impl(x, w, b, 1e-5, res)), 4 * m * HIDDEN * esz, f"{m}x{HIDDEN} +residual"
            else:
                x = torch.randn(m, FFN).to(dtype)
                fn, moved, shape = (lambda: impl(x, "gelu_tanh")), 2 * m * FFN * esz, f"{m}x{FFN} gelu_tanh"
            add(workload, shape, _median_s(fn, iters), nbytes=moved)
    elif op == "fused_moe":
        experts, top_k, hidden, inter = MOE["experts"], MOE["top_k"], MOE["hidden"], MOE["inter"]
        handle = impl.prepare((torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5).to(dtype),
                              (torch.randn(experts, hidden, inter) / inter ** 0.5).to(dtype))
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            x = torch.randn(m, hidden).to(dtype)
            ids = torch.rand(m, experts).topk(top_k, dim=-1).indices
            weights = torch.softmax(torch.randn(m, top_k), dim=-1)
            add(workload, f"{m} tokens, top-{top_k} of {experts} experts {hidden}->{inter}",
                _median_s(lambda: impl.apply(handle, x, weights, ids), iters), flops=6.0 * m * top_k * hidden * inter)
    elif op == "lora_shrink_expand":  # W1's 64 sequences, and a prefill step of 16 prompts, over 8 adapters
        for name, shards in LORA_SHARDS.items():
            k = LINEARS[name][1]
            slots = impl.create_slots(LORA_SLOTS, LORA_RANK, k, shards, dtype, torch.device("cpu"))
            for slot in range(LORA_SLOTS):
                impl.set_slot(slots, slot, {i: ((torch.randn(LORA_RANK, k) / k ** 0.5).to(dtype),
                                                (torch.randn(n, LORA_RANK) * 0.01).to(dtype))
                                            for i, n in enumerate(shards)})
            scales = torch.ones(LORA_SLOTS)
            for workload, m, per_request in (("W1 decode", 64, 1), ("W1 prefill", 2048, 128)):
                plan = impl.plan((torch.arange(m) // per_request) % LORA_SLOTS, LORA_SLOTS)
                x, y = torch.randn(m, k).to(dtype), torch.randn(m, sum(shards)).to(dtype)
                flops = 2.0 * m * LORA_RANK * (len(shards) * k + sum(shards))  # each token's own adapter only
                add(workload, f"{name} {m}x{k}->{sum(shards)} r{LORA_RANK}",
                    _median_s(lambda: impl.apply(plan, y, x, slots, scales), iters), flops=flops)
    elif op == "rotary_embedding":
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * D).to(dtype)
            q, k = qkv[:, : HEADS * D].view(m, HEADS, D), qkv[:, HEADS * D: (HEADS + KV_HEADS) * D].view(m, KV_HEADS, D)
            cos, sin = torch.rand(m, D), torch.rand(m, D)
            add(workload, f"{m} tokens", _median_s(lambda: impl(q, k, cos, sin), iters),
                nbytes=2 * m * (HEADS + KV_HEADS) * D * esz)
    elif op == "write_kv":
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            cache = torch.zeros(2, 512, 16, KV_HEADS, D, dtype=dtype)
            kv = torch.randn(m, 2, KV_HEADS, D).to(dtype)
            slots = torch.randperm(512 * 16)[:m]
            add(workload, f"{m} tokens", _median_s(lambda: impl(cache[0], cache[1], kv[:, 0], kv[:, 1], slots), iters),
                nbytes=4 * m * KV_HEADS * D * esz)
    elif op == "paged_decode_attention":
        for workload, n in (("W2", 1), ("W1 decode", 64)):
            ctx, block = 192, 16
            blocks_per = ctx // block
            cache = torch.randn(2, n * blocks_per + 8, block, KV_HEADS, D).to(dtype)
            table = torch.randperm(n * blocks_per + 8)[: n * blocks_per].view(n, blocks_per).to(torch.int32)
            lens = torch.full((n,), ctx, dtype=torch.int32)
            plan = impl.plan(table, lens, lens, block, None)
            q = torch.randn(n, HEADS, D).to(dtype)
            add(workload, f"{n} x {ctx} tokens",
                _median_s(lambda: impl.run(q, cache[0], cache[1], plan, D ** -0.5), iters),
                nbytes=2 * n * ctx * KV_HEADS * D * esz)
    elif op == "prefill_attention":
        n, length, block = 16, 128, 16
        blocks_per = length // block
        cache = torch.randn(2, n * blocks_per, block, KV_HEADS, D).to(dtype)
        table = torch.arange(n * blocks_per, dtype=torch.int32).view(n, blocks_per)
        qsl = [i * length for i in range(n + 1)]
        plan = impl.plan(table, torch.tensor(qsl, dtype=torch.int32), torch.full((n,), length, dtype=torch.int32),
                         qsl, [length] * n, [0] * n, block, None)
        q = torch.randn(n * length, HEADS, D).to(dtype)
        k, v = (cache[i].view(-1, KV_HEADS, D) for i in (0, 1))
        flops = 2 * 2 * n * HEADS * D * length * (length + 1) / 2  # causal: QK^T and PV over half the square
        add("W1 prefill", f"{n} x {length} tokens", _median_s(lambda: impl.run(q, k, v, cache[0], cache[1], plan,
                                                                                 D ** -0.5), iters), flops=flops)
    return out


# op -> bytes a weight (None: the dtype's); AQLM 2x8: two 8-bit codes per 8 weights
SWEPT_LINEARS = {"linear_dense": None, "linear_fp8": 1, "linear_int8": 1, "linear_codebook": 0.25}


def _swept_weight(impl, n: int, k: int, dtype: torch.dtype):
    """A random [n, k] weight in ``impl``'s form (FP8 and INT8 with a scale per row, as per-channel checkpoints
    have), or None where the implementation doesn't take it."""
    w = torch.randn(n, k) / k ** 0.5
    if impl.op == "linear_codebook":  # AQLM 2x8: two books of 256 entries of 8 inputs, a scale per output
        codes = torch.randint(0, 256, (n, k // 8, 2))
        return impl.prepare(codes, torch.randn(2, 256, 1, 8) / k ** 0.5, torch.rand(n) + 0.5)
    if impl.op == "linear_dense":
        return impl.prepare(w.to(dtype), None)
    if impl.op == "linear_fp8":
        scale = w.abs().amax(1, keepdim=True) / 448
        return impl.prepare((w / scale).to(torch.float8_e4m3fn), scale, k) if impl.accepts(k, k, dtype) else None
    scale = w.abs().amax(1) / 127
    return impl.prepare(torch.round(w / scale[:, None]).to(torch.int8), scale) if impl.accepts(k, dtype) else None


def _layer_sweep(impl, dtype: torch.dtype, layers: int, iters: int) -> list[dict]:
    """One linear op over ``layers`` layers' four projections, each layer's weights its own, at W2, W1 decode and
    W1 prefill batch sizes: GFLOP/s, and GB/s of weights read."""
    handles = [(_swept_weight(impl, n, k, dtype), k) for _ in range(layers) for n, k in LINEARS.values()]
    if any(h is None for h, _ in handles):
        return []
    per_weight = SWEPT_LINEARS[impl.op] or torch.finfo(dtype).bits // 8
    weights = layers * sum(n * k for n, k in LINEARS.values())
    out = []
    for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
        xs = {k: torch.randn(m, k).to(dtype) for k in {k for _, k in LINEARS.values()}}
        seconds = _median_s(lambda: [impl.apply(h, xs[k]) for h, k in handles], max(min(iters, 5), 1))
        out.append({"op": impl.op, "impl": impl.name, "workload": workload, "shape": f"{layers} layers, {m} rows",
                    "ms": seconds * 1e3, "rate": f"{2.0 * m * weights / seconds / 1e9:.0f} GFLOP/s, "
                                                  f"{weights * per_weight / seconds / 1e9:.1f} GB/s of weights"})
    return out


def ceilings(iters: int) -> dict[str, str]:
    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    matmul = _median_s(lambda: a @ b, max(iters // 4, 3))
    big = torch.ones(512 * (1 << 20) // 4)
    read = _median_s(lambda: big.sum(), max(iters // 4, 3))
    return {"bf16 matmul 2048^3": f"{2 * 2048 ** 3 / matmul / 1e9:.0f} GFLOP/s",
            "memory read (sum over 512 MiB)": f"{big.numel() * 4 / read / 1e9:.1f} GB/s"}


def main(args: argparse.Namespace) -> dict:
    from pagoda.ops import select_ops
    from pagoda.platforms import resolve_platform
    from pagoda.plugins.registry import get_registry

    dtype = getattr(torch, args.dtype)
    platform = resolve_platform(args.device)
    registry = get_registry()
    if args.all_impls:
        impls = [cls() for op in sorted(registry.ops) for cls in registry.ops[op].values()
                 if cls.unavailable_reason(platform, dtype) is None]
    else:
        impls = list(select_ops(platform, dtype, args.op_impl).implementations().values())
    describe = platform.describe()
    rows = [row for impl in impls for row in _rows(impl, dtype, args.iters)]
    if args.layers > 0:
        rows += [row for impl in impls if impl.op in SWEPT_LINEARS
                 for row in _layer_sweep(impl, dtype, args.layers, args.iters)]
    result = {"platform": platform.name, "cpu": describe.get("cpu"), "isa": describe.get("isa"),
              "dtype": args.dtype, "threads": torch.get_num_threads(), "ceilings": ceilings(args.iters), "ops": rows}
    print(f"platform {platform.name} ({result['cpu'] or '-'}), {args.dtype}, {result['threads']} threads")
    for name, value in result["ceilings"].items():
        print(f"  ceiling: {name}: {value}")
    print(f"{'op':<24}{'implementation':<18}{'workload':<16}{'shape':<34}{'ms':>9}  rate")
    for r in rows:
        print(f"{r['op']:<24}{r['impl']:<18}{r['workload']:<16}{r['shape']:<34}{r['ms']:>9.3f}  {r['rate']}")
    write_json(args.output_json, result)
    return result
