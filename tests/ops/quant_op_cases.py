"""Op cases for the quantized linear ops beyond block quantization: FP8, INT8 W8A8, additive codebooks."""

from __future__ import annotations

import torch

from tests.ops.op_cases import _check_argmax, _check_masked_greedy, _close, _gen


def fp8_weights(n: int, k: int, group: int, g: torch.Generator):
    weight = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, k // group, generator=g) * 0.01 + 1e-4
    return weight, scale


def linear_fp8(impl, ref, dtype):
    # A group as wide as k is one scale per row (per-channel checkpoints); 300 rows span two 256-row chunks of
    # the AMX path, with a short last 64-row block.
    for n, k, group in ((37, 64, 64), (576, 576, 64), (256, 256, 128), (48, 128, 128), (33, 96, 96), (80, 576, 576)):
        if not impl.accepts(k, group, dtype):
            continue
        g = _gen(n, k, group)
        weight, scale = fp8_weights(n, k, group, g)
        handle, ref_handle = impl.prepare(weight, scale, group), ref.prepare(weight, scale, group)
        exact = ref.weight(ref_handle).double()
        for rows in (1, 9, 64, 300):
            x = torch.randn(rows, k, generator=g).to(dtype)
            what = f"linear_fp8 {rows}x{k}->{n} group {group}"
            scale_of = (x.double() @ exact.T).abs().max().item()
            _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)
            torch.testing.assert_close(impl.logits(handle, x).double(), ref.logits(ref_handle, x).double(),
                                       rtol=1e-5, atol=1e-5 * scale_of, msg=what + " logits")
            greedy = impl.greedy(handle, x)
            if greedy is not None:
                _check_argmax(greedy, ref.logits(ref_handle, x).double(), what)
                _check_masked_greedy(impl, handle, x, ref.logits(ref_handle, x).double(), what)


def linear_fp8_every_code(impl, ref, dtype):
    # Every e4m3 code but the two NaNs (zero, the subnormals, both signs), each at every input position across the
    # 256 columns, read back exactly through one-hot rows: 1 row (the one-row kernel), 16 and 64 (the GEMMs).
    k = 64
    codes = (torch.arange(256)[:, None] + 37 * torch.arange(k)[None, :]) % 256
    codes[(codes & 0x7F) == 0x7F] = 0
    weight = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    for group in (k, 32):
        if not impl.accepts(k, group, dtype):
            continue
        scale = torch.ones(256, k // group)
        handle, ref_handle = impl.prepare(weight, scale, group), ref.prepare(weight, scale, group)
        exact = ref.weight(ref_handle).float()
        assert torch.equal(exact, weight.float()), "linear_fp8 reference: e4m3 codes"
        for rows in (1, 16, 64):
            x = torch.eye(k)[:rows].to(dtype)
            what = f"linear_fp8 every code, {rows} one-hot rows, group {group}"
            torch.testing.assert_close(impl.logits(handle, x).float(), exact.T[:rows], rtol=0, atol=0, msg=what)
            torch.testing.assert_close(impl.apply(handle, x).float(), exact.T[:rows], rtol=0, atol=0, msg=what)


def linear_int8(impl, ref, dtype):
    # 80 and 20 outputs: a last group of two column tiles, then of one, in the 48-column micro-kernels
    for n, k, input_scale in ((37, 64, None), (576, 576, None), (1536, 576, None), (64, 96, 0.02), (80, 128, None),
                              (20, 192, 0.02)):
        if not impl.accepts(k, dtype):
            continue
        g = _gen(n, k, 8)
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.01 + 1e-4
        handle, ref_handle = impl.prepare(weight, scale, input_scale), ref.prepare(weight, scale, input_scale)
        for rows in (1, 9, 64, 130):
            x = torch.randn(rows, k, generator=g).to(dtype)
            what = f"linear_int8 {rows}x{k}->{n} input_scale {input_scale}"
            expected = ref.logits(ref_handle, x).double()
            scale_of = expected.abs().max().item()
            # Integer sums are exact in every implementation; only the final scaling may round differently.
            torch.testing.assert_close(impl.logits(handle, x).double(), expected, rtol=1e-5, atol=1e-5 * scale_of,
                                       msg=what + " logits")
            _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)


def linear_codebook(impl, ref, dtype):
    # shards: a merged layer's outputs per shard, each with its own codebooks (None: one layer, unstacked books).
    for n, k, og, ig, m, nbits, shards in ((32, 64, 1, 8, 1, 16, None), (48, 64, 1, 8, 2, 8, None),
                                           (40, 104, 1, 8, 2, 8, None), (24, 64, 1, 8, 1, 8, None),
                                           (32, 32, 2, 4, 1, 8, None), (56, 104, 1, 8, 2, 8, [24, 8, 24]),
                                           (40, 72, 1, 8, 2, 3, [18, 22]), (32, 64, 1, 8, 1, 16, [16, 16]),
                                           (32, 32, 2, 4, 2, 8, [8, 24]), (40, 104, 1, 8, 1, 16, [18, 22]),
                                           (24, 72, 1, 8, 2, 16, None)):
        g = _gen(n, k, m, nbits)
        codes = torch.randint(0, 1 << nbits, (n // og, k // ig, m), generator=g)
        books = torch.randn(len(shards or [n]), m, 1 << nbits, og, ig, generator=g).half()
        codebooks = books if shards else books[0]
        scales = (torch.rand(n // og, 1, 1, 1, generator=g) + 0.5).half()
        handle, ref_handle = (impl.prepare(codes, codebooks, scales, shards),
                              ref.prepare(codes, codebooks, scales, shards))
        # 1, 2: the native one-row table (row by row), or tiles built in registers for books of more than 256
        # entries (16-bit codes, kept in tiles of 16 outputs: 40 outputs end in a partial tile, and the shards of
        # [18, 22] meet inside one); 9: logits from tiles built in registers, bf16 from column tiles; 24, 70: column
        # tiles for both (70: a partial row tile)
        for rows in (1, 2, 9, 24, 70):
            x = torch.randn(rows, k, generator=g).to(dtype)
            expected = ref.logits(ref_handle, x).double()
            scale_of = expected.abs().max().item()
            what = f"linear_codebook {m}x{nbits} og {og} ig {ig} shards {shards} {rows}x{k}->{n}"
            _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)
            torch.testing.assert_close(impl.logits(handle, x).double(), expected, rtol=1e-5, atol=1e-5 * scale_of,
                                       msg=what + " logits")


CASES = {"linear_fp8": [linear_fp8, linear_fp8_every_code], "linear_int8": [linear_int8],
         "linear_codebook": [linear_codebook]}


def references_match_float64(ops: dict, dtype: torch.dtype) -> None:
    """The three references against float64 maths written out from the formats' definitions."""
    g = torch.Generator().manual_seed(5)
    # FP8: w = e4m3 value * scale per group.
    weight, scale = fp8_weights(6, 64, 32, g)
    w64 = (weight.double().reshape(6, 2, 32) * scale.double()[..., None]).reshape(6, 64)
    x = torch.randn(3, 64, generator=g)
    out = ops["linear_fp8"].logits(ops["linear_fp8"].prepare(weight, scale, 32), x.to(dtype)).double()
    torch.testing.assert_close(out, x.to(dtype).double() @ w64.T, rtol=1e-5, atol=1e-4)
    # INT8: per-token symmetric codes round(x / (amax / 127)).
    wi = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    si = torch.rand(5, generator=g)
    s_tok = x.double().abs().amax(-1, keepdim=True) / 127
    acc = torch.round(x.double() / s_tok) @ wi.double().T
    out = ops["linear_int8"].logits(ops["linear_int8"].prepare(wi, si), x).double()
    torch.testing.assert_close(out, acc * s_tok * si.double(), rtol=1e-5, atol=1e-5)
    # Codebooks: tile (o, i) = scale[o] * sum_m codebook[m, code[o, i, m]].
    codes = torch.randint(0, 16, (4, 8, 2), generator=g)
    books = torch.randn(2, 16, 1, 8, generator=g)
    scales = torch.rand(4, 1, 1, 1, generator=g)
    w = torch.zeros(4, 64, dtype=torch.float64)
    for o in range(4):
        for i in range(8):
            w[o, i * 8:(i + 1) * 8] = scales[o, 0, 0, 0].double() * sum(books[m, codes[o, i, m], 0].double()
                                                                       for m in range(2))
    out = ops["linear_codebook"].logits(ops["linear_codebook"].prepare(codes, books, scales), x).double()
    torch.testing.assert_close(out, x.double() @ w.T, rtol=1e-5, atol=1e-5)
    # A merged layer: rows 0-2 take the first shard's codebooks, row 3 the second's.
    books2 = torch.randn(2, 16, 1, 8, generator=g)
    for i in range(8):
        w[3, i * 8:(i + 1) * 8] = scales[3, 0, 0, 0].double() * sum(books2[m, codes[3, i, m], 0].double()
                                                                   for m in range(2))
    merged = ops["linear_codebook"].prepare(codes, torch.stack([books, books2]), scales, [3, 1])
    torch.testing.assert_close(ops["linear_codebook"].logits(merged, x).double(), x.double() @ w.T, rtol=1e-5,
                               atol=1e-5)
