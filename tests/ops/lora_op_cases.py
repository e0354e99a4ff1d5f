"""Op-matrix cases of ``lora_shrink_expand``: every implementation against the reference, and the reference
against float64 maths of each token's own adapter, over decode-sized and prefill-sized steps with tokens of several
slots interleaved, tokens without an adapter, and a step whose tokens all share one slot."""

from __future__ import annotations

import torch

from tests.ops.op_cases import _close, _gen


def lora_shrink_expand(impl, ref, dtype):
    for slots, rank, d_in, d_out in ((1, 8, 64, 64), (4, 16, 64, 192), (3, 48, 96, 40)):
        g = _gen(slots, rank, d_in, d_out)
        lora_a = (torch.randn(slots, rank, d_in, generator=g) / d_in ** 0.5).to(dtype)
        lora_b = (torch.randn(slots, d_out, rank, generator=g) / rank ** 0.5).to(dtype)
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
                impl.apply(impl.plan(token_slots, slots), out, x, lora_a, lora_b, scales)
                ref.apply(ref.plan(token_slots, slots), expected, x, lora_a, lora_b, scales)
                what = f"lora_shrink_expand S{slots} r{rank} {tokens}x{d_in}->{d_out} {pattern}"
                scale = expected.abs().max().item()
                _close(out, expected, dtype, what, scale)
                exact = y0.double().clone()
                for t, s in enumerate(token_slots.tolist()):  # float64, one token at a time
                    if s >= 0:
                        exact[t] += (x[t].double() @ lora_a[s].double().T) @ lora_b[s].double().T * float(scales[s])
                _close(expected, exact.to(dtype), dtype, what + " reference vs float64", scale)
                untouched = token_slots < 0
                assert torch.equal(expected[untouched], y0[untouched]), what + ": rows without an adapter changed"


CASES = {"lora_shrink_expand": [lora_shrink_expand]}
