"""Shape matrices for the op tests: each case runs an implementation and the reference on the same inputs.

Tolerances: float32 implementations may sum in another order (relative 1e-5); bf16 ones may round once more
than the reference (one bf16 step, 2^-8 relative, of the result).
"""

from __future__ import annotations

import torch

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=2e-2)}


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (1 << 31))


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{what}: {out.shape}/{out.dtype} vs {ref.shape}/{ref.dtype}")
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=what)


def rms_norm(impl, ref, dtype):
    for rows, hidden in ((1, 64), (9, 576), (33, 70)):
        g = _gen(rows, hidden)
        x, residual = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2))
        weight = torch.randn(hidden, generator=g).to(dtype)
        _close(impl(x, weight, 1e-5), ref(x, weight, 1e-5), dtype, f"rms_norm {rows}x{hidden}")
        out, summed = impl(x, weight, 1e-5, residual)
        ref_out, ref_summed = ref(x, weight, 1e-5, residual)
        assert torch.equal(summed, ref_summed), "the residual stream must be exactly the dtype's add"
        _close(out, ref_out, dtype, f"rms_norm+residual {rows}x{hidden}")
        # Gemma's (1 + w) scale, multiplied before the rounding to the dtype.
        _close(impl(x, weight, 1e-6, unit_offset=True), ref(x, weight, 1e-6, unit_offset=True), dtype,
               f"rms_norm unit_offset {rows}x{hidden}")
        out, summed = impl(x, weight, 1e-6, residual, unit_offset=True)
        ref_out, ref_summed = ref(x, weight, 1e-6, residual, unit_offset=True)
        assert torch.equal(summed, ref_summed), "the residual stream must be exactly the dtype's add"
        _close(out, ref_out, dtype, f"rms_norm unit_offset+residual {rows}x{hidden}")


def layer_norm(impl, ref, dtype):
    # Sizes on both sides of the CPU kernel's switch point (16 rows of 768), hidden sizes with a ragged tail.
    for rows, hidden, affine in ((1, 64, True), (9, 768, True), (33, 70, True), (5, 64, False), (40, 768, True),
                                 (300, 70, True), (200, 64, False)):
        g = _gen(rows, hidden, affine)
        x, residual = ((torch.randn(rows, hidden, generator=g) * 3 + 1).to(dtype) for _ in range(2))
        weight = torch.randn(hidden, generator=g).to(dtype) if affine else None
        bias = torch.randn(hidden, generator=g).to(dtype) if affine else None
        what = f"layer_norm {rows}x{hidden} affine={affine}"
        _close(impl(x, weight, bias, 1e-5), ref(x, weight, bias, 1e-5), dtype, what)
        out, summed = impl(x, weight, bias, 1e-5, residual)
        ref_out, ref_summed = ref(x, weight, bias, 1e-5, residual)
        assert torch.equal(summed, ref_summed), "the residual stream must be exactly the dtype's add"
        _close(out, ref_out, dtype, what + " +residual")


def activation(impl, ref, dtype):
    for name in ("relu", "gelu", "gelu_tanh"):
        for rows, width in ((1, 40), (7, 3072), (64, 96), (33, 3001)):  # (33, 3001): past the CPU relu's switch
            x = (torch.randn(rows, width, generator=_gen(rows, width)) * 4).to(dtype)
            _close(impl(x, name), ref(x, name), dtype, f"activation {name} {rows}x{width}")


def rotary_embedding(impl, ref, dtype):
    for tokens, heads, kv_heads, d, rot in ((4, 4, 2, 64, 64), (5, 9, 3, 64, 64), (3, 4, 4, 64, 32),
                                            (7, 2, 1, 128, 128)):
        g = _gen(tokens, heads, d, rot)
        angle = torch.rand(tokens, rot // 2, generator=g) * 100
        cos = torch.cat([angle.cos()] * 2, -1)
        sin = torch.cat([-angle.sin(), angle.sin()], -1)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
        for adjacent in (True, False):  # views of a fused QKV output, and separate tensors
            base = qkv.clone()
            if adjacent:
                q = base[:, : heads * d].view(tokens, heads, d)
                k = base[:, heads * d: (heads + kv_heads) * d].view(tokens, kv_heads, d)
            else:
                q = base[:, : heads * d].reshape(tokens, heads, d).clone()
                k = base[:, heads * d: (heads + kv_heads) * d].reshape(tokens, kv_heads, d).clone()
            ref_q, ref_k = ref(q.clone(), k.clone(), cos, sin)
            v_before = base[:, (heads + kv_heads) * d:].clone()
            out_q, out_k = impl(q, k, cos, sin)
            _close(out_q, ref_q, dtype, f"rotary q {tokens}x{heads}x{d} rot {rot} adjacent={adjacent}")
            _close(out_k, ref_k, dtype, f"rotary k {tokens}x{kv_heads}x{d} rot {rot} adjacent={adjacent}")
            assert torch.equal(base[:, (heads + kv_heads) * d:], v_before), "values must be left alone"


def silu_and_mul(impl, ref, dtype):
    for rows, inter in ((1, 40), (5, 1536), (64, 96)):
        x = (torch.randn(rows, 2 * inter, generator=_gen(rows, inter)) * 4).to(dtype)
        _close(impl(x), ref(x), dtype, f"silu_and_mul {rows}x{inter}")


def gelu_and_mul(impl, ref, dtype):
    for approximate in ("none", "tanh"):
        for rows, inter in ((7, 80), (1, 40), (64, 96)):
            x = (torch.randn(rows, 2 * inter, generator=_gen(rows, inter)) * 3).to(dtype)
            _close(impl(x, approximate), ref(x, approximate), dtype, f"gelu_and_mul {approximate} {rows}x{inter}")


def linear_dense(impl, ref, dtype):
    for n, k in ((960, 576), (37, 70), (3072, 64)):
        for with_bias in (False, True):
            g = _gen(n, k, with_bias)
            w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
            b = torch.randn(n, generator=g).to(dtype) if with_bias else None
            handle, ref_handle = impl.prepare(w.clone(), None if b is None else b.clone()), ref.prepare(w, b)
            # Row counts around the implementations' switch points (AVX512 below 8 rows, AMX tiles, oneDNN from 256).
            for rows in (1, 4, 5, 8, 17, 64, 131, 300):
                x = torch.randn(rows, k, generator=g).to(dtype)
                what = f"linear_dense {rows}x{k}->{n} bias={with_bias}"
                _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what)
                logits, ref_logits = impl.logits(handle, x), ref.logits(ref_handle, x)
                assert logits.dtype == torch.float32
                _close(logits.to(dtype), ref_logits.to(dtype), dtype, what + " logits")
                greedy = impl.greedy(handle, x) if b is None else None
                if greedy is not None:
                    _check_argmax(greedy, x.double() @ w.double().T, what)
                    _check_masked_greedy(impl, handle, x, x.double() @ w.double().T, what)
            ids = torch.tensor([[0, n - 1], [n // 2, 1]])
            assert torch.equal(impl.rows(handle, ids), w[ids]), "rows must be the weight's rows exactly"
            if b is None:
                _lm_head_greedy(impl, w, g, dtype)


def _lm_head_greedy(impl, w: torch.Tensor, g: torch.Generator, dtype: torch.dtype) -> None:
    """An LM head's form (which may carry a greedy path of its own, a screened one on CPUs): its greedy argmax is
    the argmax of its own logits exactly, masked or not, at the row counts a decode step sends."""
    n, k = w.shape
    w = w.clone()
    near = torch.arange(1, n, max(1, n // 8))[:6]
    w[near] = (w[0].float() + torch.randn(len(near), k, generator=g) * 2e-3 * w[0].float().abs().max()).to(dtype)
    head = impl.prepare_lm_head(w, None)
    for rows in (1, 3, 4, 5, 8):
        # Rows along column 0, which a few columns nearly tie: the order among them needs the exact products.
        x = (w[0].float() * k ** 0.5 + torch.randn(rows, k, generator=g) * 0.1).to(dtype)
        logits = impl.logits(head, x)
        greedy = impl.greedy(head, x)
        if greedy is None:
            continue
        what = f"linear_dense LM head {rows}x{k}->{n}"
        assert torch.equal(greedy, logits.argmax(-1)), f"{what}: greedy must be the argmax of the logits"
        allowed = torch.rand(rows, n, generator=g) < 0.3
        words = mask_words(allowed)
        expected = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        assert torch.equal(impl.greedy(head, x, words), expected), f"{what}: masked greedy"


def _check_argmax(greedy: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """The chosen column is a maximum of the exact product up to rounding (ties may go either way)."""
    top = exact.max(-1).values
    picked = exact.gather(1, greedy[:, None])[:, 0]
    assert (top - picked <= 1e-2 * top.abs().clamp(min=1)).all(), f"{what}: greedy picked a non-maximum"


def mask_words(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean [rows, n] token mask as the greedy kernels read it: int32 words, bit t % 32 of word t // 32."""
    rows, n = allowed.shape
    padded = torch.zeros(rows, (n + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :n] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # as int32 bit patterns


def _check_masked_greedy(impl, handle, x: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """With a token bitmask (a grammar's constraint: about a third of the columns allowed, the unmasked argmax
    forbidden), the argmax is a maximum over the allowed columns."""
    rows, n = exact.shape
    g = torch.Generator().manual_seed(rows * 7919 + n)
    allowed = torch.rand(rows, n, generator=g) < 0.3
    allowed[torch.arange(rows), exact.argmax(-1)] = False
    allowed[:, n // 2] = True  # never an empty row
    greedy = impl.greedy(handle, x, mask_words(allowed))
    if greedy is None:
        return
    assert allowed.gather(1, greedy[:, None]).all(), f"{what}: masked greedy picked a forbidden column"
    _check_argmax(greedy, exact.masked_fill(~allowed, float("-inf")), what + " masked")


def block_quant_weights(bits: int, n: int, k: int, g: torch.Generator):
    if bits == 4:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        offset = torch.randn(n, k // 32, generator=g) * 0.01
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        offset = None
    scale = torch.rand(n, k // 32, generator=g) * 0.01
    return codes, scale, offset


def linear_block_quant(impl, ref, dtype):
    for bits in (4, 8):
        for n, k in ((37, 64), (576, 576), (64, 96)):
            if not impl.accepts(k, dtype):
                continue
            g = _gen(bits, n, k)
            codes, scale, offset = block_quant_weights(bits, n, k, g)
            handle, ref_handle = impl.prepare(codes, scale, offset, bits), ref.prepare(codes, scale, offset, bits)
            exact = ref.weight(ref_handle).double()
            for rows in (1, 9, 64):
                x = torch.randn(rows, k, generator=g).to(dtype)
                what = f"linear_block_quant q{bits} {rows}x{k}->{n}"
                scale_of = (x.double() @ exact.T).abs().max().item()
                _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)
                torch.testing.assert_close(impl.logits(handle, x).double(), x.double() @ exact.T, rtol=1e-5,
                                           atol=1e-5 * scale_of, msg=what + " logits (float32 sums of exact products)")
                greedy = impl.greedy(handle, x)
                if greedy is not None:
                    _check_argmax(greedy, x.double() @ exact.T, what)
                    _check_masked_greedy(impl, handle, x, x.double() @ exact.T, what)
            ids = torch.tensor([[0, n - 1], [n // 2, 1]])
            torch.testing.assert_close(impl.rows(handle, ids, torch.float64), exact[ids], rtol=1e-6, atol=1e-7)
            _check_rows_in_activation_dtypes(impl, handle, ids, exact[ids])


def _check_rows_in_activation_dtypes(impl, handle, ids, exact):
    """Embedding lookups in the dtypes models run in (where a kernel may gather natively): float32 to the exact
    values' precision, bf16 the float32 rows rounded."""
    rows32 = impl.rows(handle, ids, torch.float32)
    assert rows32.dtype == torch.float32 and rows32.shape == exact.shape
    torch.testing.assert_close(rows32.double(), exact, rtol=1e-6, atol=1e-7)
    assert torch.equal(impl.rows(handle, ids, torch.bfloat16), rows32.to(torch.bfloat16)), "bf16 rows"


def linear_block_quant_zero(impl, ref, dtype):
    """Codes with a scale and an integer zero per group of 32 and up (AWQ / GPTQ / W4A16 / W8A16's form): 4-bit codes
    0..15, or 8-bit ones as int8 (code and zero less 128); float16 scales, and bfloat16 ones float16 can't hold."""
    cases = ((4, 32, 37, 64, torch.float16), (4, 64, 576, 576, torch.float16), (4, 128, 48, 256, torch.float16),
             (4, 256, 40, 512, torch.float16), (8, 32, 37, 64, torch.float16), (8, 64, 576, 576, torch.float16),
             (8, 128, 48, 256, torch.float16), (8, 192, 40, 384, torch.float16), (8, 32, 48, 96, torch.bfloat16))
    accepts = getattr(impl, "accepts_zero", None)  # optional in the op's contract
    for bits, group, n, k, scale_dtype in cases:
        if accepts is None or not accepts(k, group, dtype, bits):
            continue
        g = _gen(bits, group, n, k)
        if bits == 4:
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            zero = torch.randint(0, 17, (n, k // group), generator=g).float()
        else:
            codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            zero = torch.randint(-128, 128, (n, k // group), generator=g).float()
        scale = (torch.rand(n, k // group, generator=g) * 0.01).to(scale_dtype).float()
        if scale_dtype == torch.bfloat16:
            scale[0, 0] = 2.0 ** -30  # below float16's range
        handle = impl.prepare_zero(codes, scale, zero, group, bits)
        ref_handle = ref.prepare_zero(codes, scale, zero, group, bits)
        exact = (codes.double().unflatten(1, (-1, group)) - zero.double()[..., None]) * scale.double()[..., None]
        exact = exact.flatten(1)
        torch.testing.assert_close(ref.weight(ref_handle).double(), exact, rtol=0, atol=0)
        for rows in (1, 9, 64):
            x = torch.randn(rows, k, generator=g).to(dtype)
            what = f"linear_block_quant zero {bits}-bit group {group} {scale_dtype} scales {rows}x{k}->{n}"
            scale_of = (x.double() @ exact.T).abs().max().item()
            _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)
            torch.testing.assert_close(impl.logits(handle, x).double(), x.double() @ exact.T, rtol=1e-5,
                                       atol=1e-5 * scale_of, msg=what + " logits")
            greedy = impl.greedy(handle, x)
            if greedy is not None:
                _check_argmax(greedy, x.double() @ exact.T, what)
                _check_masked_greedy(impl, handle, x, x.double() @ exact.T, what)


def linear_block_quant_affine(impl, ref, dtype):
    """int8 codes with a float32 scale and offset per group of 16 or 32 (GGUF's K-quant sub-blocks)."""
    accepts = getattr(impl, "accepts_affine", None)
    for group, n, k, with_offset in ((16, 37, 64, True), (16, 64, 256, False), (32, 576, 576, True),
                                     (32, 48, 96, True)):
        if accepts is None or not accepts(k, group, dtype):
            continue
        g = _gen(group, n, k)
        codes = torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, k // group, generator=g) * 0.01
        offset = torch.randn(n, k // group, generator=g) * 0.01 if with_offset else None
        handle, ref_handle = (impl.prepare_affine(codes, scale, offset, group),
                              ref.prepare_affine(codes, scale, offset, group))
        exact = codes.double().unflatten(1, (-1, group)) * scale.double()[..., None]
        if offset is not None:
            exact = exact + offset.double()[..., None]
        exact = exact.flatten(1)
        torch.testing.assert_close(ref.weight(ref_handle).double(), exact, rtol=1e-6, atol=1e-8)
        for rows in (1, 9, 64):
            x = torch.randn(rows, k, generator=g).to(dtype)
            what = f"linear_block_quant affine group {group} {rows}x{k}->{n}"
            scale_of = (x.double() @ exact.T).abs().max().item()
            _close(impl.apply(handle, x), ref.apply(ref_handle, x), dtype, what, scale_of)
            torch.testing.assert_close(impl.logits(handle, x).double(), x.double() @ exact.T, rtol=1e-5,
                                       atol=1e-5 * scale_of, msg=what + " logits")
            greedy = impl.greedy(handle, x)
            if greedy is not None:
                _check_argmax(greedy, x.double() @ exact.T, what)
                _check_masked_greedy(impl, handle, x, x.double() @ exact.T, what)
        ids = torch.tensor([[0, n - 1], [n // 2, 1]])
        torch.testing.assert_close(impl.rows(handle, ids, torch.float64), ref.rows(ref_handle, ids, torch.float64),
                                   rtol=0, atol=0)
        _check_rows_in_activation_dtypes(impl, handle, ids, ref.rows(ref_handle, ids, torch.float64))


def _paged_cache(num_blocks, block_size, kv_heads, d, dtype, g):
    cache = torch.randn(2, num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    return cache[0], cache[1]


def write_kv(impl, ref, dtype):
    for tokens, kv_heads, d, block_size in ((1, 2, 64, 16), (37, 3, 64, 16), (20, 1, 128, 32)):
        g = _gen(tokens, kv_heads, d)
        kc, vc = _paged_cache(8, block_size, kv_heads, d, dtype, g)
        kv = torch.randn(tokens, 2 * kv_heads * d, generator=g).to(dtype)  # strided views, as a fused QKV leaves
        key, value = kv[:, : kv_heads * d].view(tokens, kv_heads, d), kv[:, kv_heads * d:].view(tokens, kv_heads, d)
        slots = torch.randperm(8 * block_size, generator=g)[:tokens]
        ours, theirs = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
        impl(*ours, key, value, slots)
        ref(*theirs, key, value, slots)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), "write_kv must copy exactly"


def paged_decode_attention(impl, ref, dtype):
    # The last two soft-cap the logits (Gemma 2), globally and in a window.
    for heads, kv_heads, d, block_size, window, cap in ((4, 2, 64, 16, None, None), (9, 3, 64, 16, None, None),
                                                        (8, 1, 128, 32, None, None), (4, 4, 64, 16, 7, None),
                                                        (8, 2, 64, 16, None, 2.0), (4, 2, 80, 16, 7, 5.0)):
        g = _gen(heads, kv_heads, d, block_size, window or 0)
        kc, vc = _paged_cache(40, block_size, kv_heads, d, dtype, g)
        seq_lens = torch.tensor([1, 17, 40, 95, 3], dtype=torch.int32)
        n, max_blocks = len(seq_lens), -(-int(seq_lens.max()) // block_size)
        table = torch.randperm(40, generator=g)[: n * (max_blocks + 1)].view(n, -1).to(torch.int32)[:, :max_blocks]
        query = torch.randn(n, heads, d, generator=g).to(dtype)
        scale = d ** -0.5
        out = impl.run(query, kc, vc, impl.plan(table, seq_lens, seq_lens, block_size, window), scale, cap)
        expected = ref.run(query, kc, vc, ref.plan(table, seq_lens, seq_lens, block_size, window), scale, cap)
        _close(out, expected, dtype, f"decode {heads}/{kv_heads}x{d} block {block_size} window {window} cap {cap}")
    # One long sequence (single-stream decode), which a kernel may split over its threads and merge.
    for heads, kv_heads, d, block_size, seq_len, window in ((9, 3, 64, 16, 150, None), (8, 1, 128, 32, 613, None),
                                                            (9, 3, 64, 16, 520, 300), (4, 2, 64, 16, 513, 100)):
        g = _gen(heads, kv_heads, d, block_size, seq_len)
        num_blocks = -(-seq_len // block_size)
        kc, vc = _paged_cache(num_blocks + 4, block_size, kv_heads, d, dtype, g)
        table = torch.randperm(num_blocks + 4, generator=g)[:num_blocks].view(1, -1).to(torch.int32)
        seq_lens = torch.tensor([seq_len], dtype=torch.int32)
        query = torch.randn(1, heads, d, generator=g).to(dtype)
        out = impl.run(query, kc, vc, impl.plan(table, seq_lens, seq_lens, block_size, window), d ** -0.5)
        expected = ref.run(query, kc, vc, ref.plan(table, seq_lens, seq_lens, block_size, window), d ** -0.5)
        _close(out, expected, dtype, f"decode of one {seq_len}-token sequence, {heads}/{kv_heads}x{d} window {window}")


def prefill_attention(impl, ref, dtype):
    for heads, kv_heads, d, block_size, window, cap in ((4, 2, 64, 16, None, None), (9, 3, 64, 16, None, None),
                                                        (8, 8, 128, 32, None, None), (4, 2, 64, 16, 9, None),
                                                        (4, 2, 64, 16, None, 2.0), (8, 4, 64, 32, 9, 5.0)):
        g = _gen(heads, kv_heads, d, block_size, window or 1)
        # (tokens cached before, chunk length): a fresh prompt, a prefix-cache hit, a later chunk, a long one
        spans = [(0, 9), (0, 9), (0, 5), (16, 11), (37, 1), (0, 70)]
        kc, vc = _paged_cache(64, block_size, kv_heads, d, dtype, g)
        blocks = torch.randperm(64, generator=g).to(torch.int32)
        max_blocks = max(-(-(c + q) // block_size) for c, q in spans)
        table = torch.zeros(len(spans), max_blocks, dtype=torch.int32)
        keys, values, qsl, used = [], [], [0], 0
        for i, (computed, q_len) in enumerate(spans):
            n_blocks = -(-(computed + q_len) // block_size)
            table[i, :n_blocks] = blocks[used:used + n_blocks]
            used += n_blocks
            positions = torch.arange(computed, computed + q_len)
            slot_blocks = table[i].long()[positions // block_size]
            keys.append(kc[slot_blocks, positions % block_size])  # this chunk's keys, already in the cache
            values.append(vc[slot_blocks, positions % block_size])
            qsl.append(qsl[-1] + q_len)
        key, value = torch.cat(keys), torch.cat(values)
        query = torch.randn(qsl[-1], heads, d, generator=g).to(dtype)
        seq_lens = [c + q for c, q in spans]
        args = (table, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), qsl,
                seq_lens, [c for c, _ in spans], block_size, window)
        scale = d ** -0.5
        out = impl.run(query, key, value, kc, vc, impl.plan(*args), scale, cap)
        expected = ref.run(query, key, value, kc, vc, ref.plan(*args), scale, cap)
        _close(out, expected, dtype, f"prefill {heads}/{kv_heads}x{d} block {block_size} window {window} cap {cap}")


CASES = {"rms_norm": [rms_norm], "layer_norm": [layer_norm], "activation": [activation],
         "rotary_embedding": [rotary_embedding], "silu_and_mul": [silu_and_mul], "gelu_and_mul": [gelu_and_mul],
         "linear_dense": [linear_dense],
         "linear_block_quant": [linear_block_quant, linear_block_quant_zero, linear_block_quant_affine],
         "write_kv": [write_kv], "paged_decode_attention": [paged_decode_attention],
         "prefill_attention": [prefill_attention]}

