"""Op-matrix cases of ``lora_shrink_expand``: every implementation against the reference, and the reference
against float64 maths of each token's own adapter, over decode-sized and prefill-sized steps with tokens of several
slots interleaved, tokens without an adapter, and a step whose tokens all share one slot; layers of one shard and
merged ones (q/k/v) with adapters of lower rank than the slots, shards an adapter leaves out, and slots written
over (an adapter evicted for another must leave nothing of itself behind)."""

from __future__ import annotations

import torch

from tests.ops.op_cases import _close, _gen

# (slots, max_rank, input size, output sizes, each slot's adapter: rank per shard, None where it leaves one out)
LAYERS = (
    (1, 8, 64, [64], [[8]]),
    (4, 16, 64, [192], [[16], [8], [16], [4]]),
    (3, 48, 96, [40], [[48], [48], [33]]),
    (3, 16, 70, [48, 24, 24], [[16, 16, 16], [8, None, 8], [None, 16, None]]),
    (2, 16, 64, [100, 100], [[16, 16], [16, None]]),
    (2, 64, 128, [80], [[64], [40]]),
    (2, 7, 64, [40, 24], [[7, 5], [3, None]]),  # an odd rank: the native expand pads each row to whole pairs
)


def _adapter(g, ranks, d_in, output_sizes, dtype):
    return {shard: ((torch.randn(rank, d_in, generator=g) / d_in ** 0.5).to(dtype),
                    (torch.randn(out, rank, generator=g) / rank ** 0.5).to(dtype))
            for shard, (rank, out) in enumerate(zip(ranks, output_sizes)) if rank is not None}


def lora_shrink_expand(impl, ref, dtype):
    for slots, max_rank, d_in, output_sizes, ranks in LAYERS:
        g = _gen(slots, max_rank, d_in, *output_sizes)
        d_out = sum(output_sizes)
        offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        stores = [op.create_slots(slots, max_rank, d_in, output_sizes, dtype, torch.device("cpu"))
                  for op in (impl, ref)]
        for op, store in zip((impl, ref), stores):  # what the memory budget counts is what the slots take
            assert op.slots_nbytes(slots, max_rank, d_in, output_sizes, dtype) == store.nbytes(), type(op).name
        # Every slot first holds another adapter (of full rank on every shard), then is written over.
        for slot in range(slots):
            stale = _adapter(g, [max_rank] * len(output_sizes), d_in, output_sizes, dtype)
            for op, store in zip((impl, ref), stores):
                op.set_slot(store, slot, stale)
        adapters = [_adapter(g, r, d_in, output_sizes, dtype) for r in ranks]
        for slot, adapter in enumerate(adapters):
            for op, store in zip((impl, ref), stores):
                op.set_slot(store, slot, adapter)
        scales = torch.rand(slots, generator=g) + 0.5
        for tokens in (1, 5, 64, 130):
            for pattern in ("mixed", "single"):
                if pattern == "mixed":
                    token_slots = torch.randint(-1, slots, (tokens,), generator=g)
                else:
                    token_slots = torch.full((tokens,), slots - 1, dtype=torch.int64)
                x = torch.randn(tokens, d_in, generator=g).to(dtype)
                y0 = torch.randn(tokens, d_out, generator=g).to(dtype)
                out, expected = y0.clone(), y0.clone()
                impl.apply(impl.plan(token_slots, slots), out, x, stores[0], scales)
                ref.apply(ref.plan(token_slots, slots), expected, x, stores[1], scales)
                what = f"lora_shrink_expand S{slots} r{max_rank} {tokens}x{d_in}->{output_sizes} {pattern}"
                scale = expected.abs().max().item()
                _close(out, expected, dtype, what, scale)
                exact = y0.double().clone()
                for t, s in enumerate(token_slots.tolist()):  # float64, one token at a time
                    for shard, (a, b) in (adapters[s].items() if s >= 0 else ()):
                        cols = slice(offsets[shard], offsets[shard] + output_sizes[shard])
                        exact[t, cols] += (x[t].double() @ a.double().T) @ b.double().T * float(scales[s])
                _close(expected, exact.to(dtype), dtype, what + " reference vs float64", scale)
                untouched = token_slots < 0
                for name, result in (("reference", expected), ("implementation", out)):
                    assert torch.equal(result[untouched], y0[untouched]), (
                        f"{what}: {name} changed rows without an adapter")


CASES = {"lora_shrink_expand": [lora_shrink_expand]}
