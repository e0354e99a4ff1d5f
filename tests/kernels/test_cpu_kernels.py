"""The native CPU kernels against direct float64 computations of the same maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.ops.reference import rotate
from tests.ops.op_cases import block_quant_weights
from pagoda.platforms.cpu import features
from pagoda.platforms.cpu.kernels import cpu, cpu_head, cpu_ops

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason=f"native CPU kernels: {cpu.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


packed = pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_packed_bf16),
                            reason="this CPU has no AVX512-BF16: the packed bf16 GEMM is not built")


# The AMX tile path wherever this CPU and process can run it (tiles from 8 rows when K is a multiple of 32).
AMX = [False] + ([True] if cpu.kernels() and cpu.kernels().has_amx and features.amx_refusal() is None else [])


@packed
@pytest.mark.parametrize("amx", AMX, ids=[f"amx={a}" for a in AMX])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 13, 16, 17, 33, 64, 65, 131])
@pytest.mark.parametrize("n,k", [(960, 576), (37, 70), (5, 9), (4096, 64), (40, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(rows, n, k, with_bias, amx):
    g = torch.Generator().manual_seed(n * 100 + k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    weight = cpu_ops.pack_weight(w, b)
    out = cpu_ops.packed_linear(x, weight, amx=amx)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    # Products of bf16 values are exact in float32; what differs from float64 is the float32 sum and, for the
    # bf16 output, one final rounding (relative 2^-8).
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-3 * k ** 0.5)
    logits = cpu_ops.packed_linear(x, weight, float_output=True, amx=amx)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-4)


@packed
def test_packed_weight_round_trips_and_serves_embedding_rows():
    w = torch.randn(37, 33).bfloat16()
    weight = cpu_ops.pack_weight(w)
    assert torch.equal(weight.unpack(), w)
    ids = torch.tensor([[0, 5, 36], [17, 16, 15]])
    assert torch.equal(weight.rows(ids), w[ids])
    many = torch.randint(0, 37, (300,))  # rows gathered on several threads
    assert torch.equal(weight.rows(many), w[many])
    assert weight.rows(torch.tensor([], dtype=torch.int64)).shape == (0, 33)
    for bad in (37, -1):
        with pytest.raises(IndexError, match="out of range"):
            weight.rows(torch.tensor([3, bad]))


@packed
def test_packed_linear_keeps_leading_dims():
    weight = cpu_ops.pack_weight(torch.randn(48, 64).bfloat16())
    x = torch.randn(2, 3, 64).bfloat16()
    out = cpu_ops.packed_linear(x, weight)
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, cpu_ops.packed_linear(x.view(6, 64), weight).view(2, 3, 48))
    with pytest.raises(TypeError, match="bfloat16"):
        cpu_ops.packed_linear(x.float(), weight)


def reference_decode(q, key_cache, value_cache, block_table, seq_lens, scale, window):
    """One sequence at a time, float64, keys/values gathered token by token through the block table."""
    n, heads, d = q.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for i in range(n):
        length = int(seq_lens[i])
        pos = torch.arange(length)
        if window:
            pos = pos[pos >= length - window]
        blocks = block_table[i, pos // block_size].long()
        k = key_cache[blocks, pos % block_size].double()  # [t, kv_heads, d]
        v = value_cache[blocks, pos % block_size].double()
        for h in range(heads):
            s = (k[:, h // group] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ v[:, h // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 40), (8, 1, 128)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_reads_paged_cache(dtype, heads, kv_heads, d, window):
    g = torch.Generator().manual_seed(heads * 1000 + d)
    block_size, num_blocks = 16, 40
    # The kernel receives kv_cache[0] / kv_cache[1] of a [2, blocks, block_size, kv_heads, d] cache.
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    seq_lens = torch.tensor([1, 5, 16, 17, 70, 129], dtype=torch.int32)
    max_blocks = 12
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).to(torch.int32)  # scattered, never block 0
    used = 0
    for i, length in enumerate(seq_lens.tolist()):
        nb = -(-length // block_size)
        table[i, :nb] = perm[used:used + nb]
        used += nb
    q = torch.randn(len(seq_lens), heads, d, generator=g).to(dtype)
    scale = d ** -0.5
    out = cpu_ops.decode_attention(q, kv_cache[0], kv_cache[1], table, seq_lens, scale, window)
    ref = reference_decode(q, kv_cache[0], kv_cache[1], table, seq_lens, scale, window)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_attention_with_strided_query_and_table_rows():
    """The runner hands over a slice of the batch's block table and a query split from a fused QKV output."""
    kv_cache = torch.randn(2, 8, 4, 2, 16)
    table = torch.arange(1, 9, dtype=torch.int32).view(2, 4)[:, :3]  # rows strided by 4
    seq_lens = torch.tensor([9, 12], dtype=torch.int32)
    qkv = torch.randn(2, 4 * 16 + 2 * 2 * 16)
    q = qkv[:, :64].view(2, 4, 16)  # not contiguous
    out = cpu_ops.decode_attention(q, kv_cache[0], kv_cache[1], table, seq_lens, 0.25, None)
    ref = reference_decode(q, kv_cache[0], kv_cache[1], table, seq_lens, 0.25, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_unavailable_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_CACHE_ROOT", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu.reset_for_tests()
    try:
        assert cpu.kernels() is None
        assert "no-such-compiler" in cpu.unavailable_reason()
        # Every native op implementation then reports itself unavailable, with that reason.
        from pagoda.ops import select_ops
        from pagoda.platforms import resolve_platform

        choice = select_ops(resolve_platform("cpu"), torch.bfloat16).choices["rms_norm"]
        assert choice.chosen == "torch"
        assert any(name == "cpu_native" and "no-such-compiler" in why for name, why in choice.passed_over)
    finally:
        monkeypatch.undo()
        cpu.reset_for_tests()
    assert cpu.kernels() is not None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PAGODA_CPU_KERNELS", "0")
    cpu.reset_for_tests()
    try:
        assert cpu.kernels() is None
        assert cpu.unavailable_reason() == "disabled by PAGODA_CPU_KERNELS=0"
    finally:
        monkeypatch.undo()
        cpu.reset_for_tests()


BF16_ROUNDING = dict(rtol=2 ** -7, atol=1e-2)  # one bf16 rounding of the result (and of the inputs' sum)


@pytest.mark.parametrize("hidden", [576, 70])
def test_rms_norm_with_and_without_residual(hidden):
    g = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(9, hidden, generator=g).bfloat16() for _ in range(2))
    weight = torch.randn(hidden, generator=g).bfloat16()

    def ref(v):
        v = v.double()
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()

    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5).double(), ref(x), **BF16_ROUNDING)
    out, summed = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual)  # the residual stream is exactly torch's bf16 add
    torch.testing.assert_close(out.double(), ref(summed), **BF16_ROUNDING)


@pytest.mark.parametrize("inter", [1536, 40])
def test_silu_and_mul(inter):
    x = (torch.randn(5, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).bfloat16()
    gate, up = x.double().chunk(2, -1)
    torch.testing.assert_close(cpu_ops.gated_activation(x, "silu").double(), F.silu(gate) * up, **BF16_ROUNDING)


@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_in_place_on_a_fused_qkv_view(rotary_dim):
    from transformers import LlamaConfig

    from pagoda.models.layers import RotaryEmbedding

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, partial_rotary_factor=rotary_dim / 64)
    rope = RotaryEmbedding(config, 64, 128, torch.bfloat16)
    positions = torch.tensor([0, 5, 17, 127])
    qkv = torch.randn(4, (4 + 2 * 2) * 64).bfloat16()
    q = qkv[:, :256].view(4, 4, 64)
    cos, sin = rope.lookup(positions)
    expected = rotate(q.double(), cos[:, None].double(), sin[:, None].double())  # the reference maths, in float64
    untouched = qkv[:, 256:].clone()
    out = cpu_ops.rotary_(q, cos, sin)
    assert out.data_ptr() == q.data_ptr()
    torch.testing.assert_close(q.double(), expected, **BF16_ROUNDING)
    assert torch.equal(qkv[:, 256:], untouched)


@packed
@pytest.mark.parametrize("amx", AMX, ids=[f"amx={a}" for a in AMX])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,rows", [(37, 64, 3), (576, 576, 1), (1536, 576, 9), (64, 96, 64), (40, 128, 70)])
def test_quant_linear_is_exact_products_summed_in_float32(bits, n, k, rows, amx):
    g = torch.Generator().manual_seed(bits * 1000 + n + k + rows)
    codes, scale, offset = block_quant_weights(bits, n, k, g)
    if bits == 8:
        scale = scale.half().float()  # 8-bit weights keep Q8_0's float16 scales
    weight = codes.double() * scale.double().repeat_interleave(32, 1)
    if offset is not None:
        weight += offset.double().repeat_interleave(32, 1)
    packed_weight = cpu_ops.pack_quantized(codes, scale, offset, bits)
    x = torch.randn(rows, k, generator=g).bfloat16()
    ref = x.double() @ weight.T
    out = cpu_ops.quant_linear(x, packed_weight, float_output=True, amx=amx)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(cpu_ops.quant_linear(x, packed_weight, amx=amx).double(), ref, **BF16_ROUNDING)
    ids = torch.tensor([[0, n - 1], [n // 2, 1]])
    torch.testing.assert_close(packed_weight.rows(ids, torch.float64), weight[ids], rtol=1e-6, atol=1e-7)


def test_rotary_embedding_rotates_adjacent_q_and_k_in_one_pass():
    """The native rotary op on q/k views of a fused QKV output (the model's case) equals the reference maths."""
    from transformers import LlamaConfig

    from pagoda.models.layers import RotaryEmbedding
    from pagoda.platforms.cpu.ops import NativeRotary

    rope = RotaryEmbedding(LlamaConfig(hidden_size=576, num_attention_heads=9), 64, 256, torch.bfloat16)
    qkv = torch.randn(5, (9 + 2 * 3) * 64).bfloat16()
    q, k, v = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k = q.view(5, 9, 64), k.view(5, 3, 64)
    cos, sin = rope.lookup(torch.tensor([0, 1, 7, 100, 255]))
    expected_q = rotate(q.double(), cos[:, None].double(), sin[:, None].double())
    expected_k = rotate(k.double(), cos[:, None].double(), sin[:, None].double())
    v_before = v.clone()
    out_q, out_k = NativeRotary()(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place, in one call
    torch.testing.assert_close(out_q.double(), expected_q, **BF16_ROUNDING)
    torch.testing.assert_close(out_k.double(), expected_k, **BF16_ROUNDING)
    assert torch.equal(v, v_before)


@packed
@pytest.mark.parametrize("form", ["bf16", "q4", "q8"] + (["bf16-amx"] if True in AMX else []))
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_argmax_equals_argmax_of_the_logits(form, rows):
    g = torch.Generator().manual_seed(rows)
    n, k = 5000, 96  # several 2048-column chunks and a partial one
    x = torch.randn(rows, k, generator=g).bfloat16()
    amx = form.endswith("-amx")
    form = form.removesuffix("-amx")
    if form == "bf16":
        weight = cpu_ops.pack_weight(torch.randn(n, k, generator=g).bfloat16())
        logits = cpu_ops.packed_linear(x, weight, float_output=True, amx=amx)
    else:
        bits = 4 if form == "q4" else 8
        codes = (torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8) if bits == 4
                 else torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
        scale = (torch.rand(n, k // 32, generator=g) * 0.01).half().float()
        offset = torch.randn(n, k // 32, generator=g) * 0.01 if bits == 4 else None
        weight = cpu_ops.pack_quantized(codes, scale, offset, bits)
        logits = cpu_ops.quant_linear(x, weight, float_output=True)
    assert torch.equal(cpu_head.linear_argmax(x, weight, amx=amx), logits.argmax(-1))
    # a tie across chunks: the first maximum wins
    if form == "bf16":
        w = torch.zeros(n, k).bfloat16()
        w[[3000, 100, 4500], 0] = 1.0
        tied = cpu_ops.pack_weight(w)
        ones = torch.ones(rows, k).bfloat16()
        assert (cpu_head.linear_argmax(ones, tied, amx=amx) == 100).all()
        # NaN columns win over any number, the first NaN among them (torch's argmax)
        w[[4500, 3000], 1] = float("nan")
        with_nan = cpu_ops.pack_weight(w)
        assert (cpu_head.linear_argmax(ones, with_nan, amx=amx) == 3000).all()
        assert torch.equal(cpu_ops.packed_linear(ones, with_nan, float_output=True, amx=amx).argmax(-1),
                           cpu_head.linear_argmax(ones, with_nan, amx=amx))


# The library is built with -march=native, so each CPU compiles only its own paths. These targets stand for the kinds
# of x86 CPU pagoda runs on: AVX2 without AVX-512 (the native library must still build there, its AVX-512 kernels left
# out), AVX-512 without BF16 (Skylake-X / Cascade Lake), and AMX-BF16 / AMX-INT8 with AVX512-BF16 (the Intel Xeons
# pagoda targets), each with the macro that proves the compiler took it.
MARCH_TARGETS = {"x86-64-v3": "__AVX2__", "x86-64-v4": "__AVX512F__", "sapphirerapids": "__AMX_BF16__"}


@pytest.mark.parametrize("march", MARCH_TARGETS)
def test_kernels_compile_for_every_cpu_kind(march):
    """The sources are type-checked for each kind of CPU, so a change that breaks the paths another CPU compiles (the
    AMX ones, or the build without AVX-512) fails here on any machine, not first on that CPU."""
    import subprocess

    compiler = cpu._find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    probe = subprocess.run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", "/dev/null"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or MARCH_TARGETS[march] not in probe.stdout:
        pytest.skip(f"{compiler} does not target -march={march}")
    flags = [flag for flag in cpu.FLAGS if flag not in ("-shared", "-march=native", "-O3")]
    checks = {source: subprocess.Popen([compiler, *flags, f"-march={march}", "-fsyntax-only", str(source)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for source in cpu.SOURCES}  # side by side, as the build compiles them
    for source, check in checks.items():
        _, stderr = check.communicate()
        assert check.returncode == 0, f"{source.name} for -march={march}:\n{stderr[-4000:]}"
