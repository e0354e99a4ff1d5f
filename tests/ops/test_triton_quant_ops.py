"""The CUDA platform's Triton quantized linear kernels against the torch references.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set here before
the kernels are jitted; :mod:`pagoda.platforms.cuda_quant_ops` jits them on first use). With a GPU the same tests
run the compiled kernels on it. The interpreter is lenient about things the compiler rejects, so the kernels are
also compiled ahead of time for sm_80 and sm_90 in a subprocess (interpreted kernels can't compile; no GPU needed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: pip install pagoda-llm[cuda]")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pagoda.ops.reference import LinearBlockQuant  # noqa: E402
from pagoda.ops.reference_quant import LinearFp8, LinearInt8, quantize_int8_per_token  # noqa: E402
from tests.ops.op_cases import TOL, _gen  # noqa: E402
from tests.ops.quant_op_cases import fp8_weights  # noqa: E402
from tests.ops.triton_kernels import fresh_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# float16 keeps 3 more mantissa bits than bfloat16: the bf16 tolerance holds it with room to spare.
TOLS = {**TOL, torch.float16: TOL[torch.bfloat16]}
# (rows, out features, in features): decode and prefill row counts, one and several K tiles, a partial K tile (96).
SHAPES = ((1, 16, 64), (5, 48, 128), (16, 48, 64), (5, 16, 96), (40, 80, 128))


@pytest.fixture(scope="module")
def qops():
    return fresh_kernels("cuda_quant_ops", "kernels")


@pytest.fixture(scope="module")
def iops(qops):
    return fresh_kernels("cuda_int8_ops", "kernels")


def _close(out, ref, dtype, what, scale=1.0):
    assert (out.shape, out.dtype) == (ref.shape, ref.dtype), f"{what}: {out.shape}/{out.dtype} vs {ref.dtype}"
    tol = TOLS[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=what)


def _logits_close(out, expected, scale, what):
    assert out.dtype == torch.float32, what
    torch.testing.assert_close(out.double().cpu(), expected.double().cpu(), rtol=1e-5, atol=1e-5 * scale,
                               msg=what + " logits")


def _block_weights(bits, n, k, g):
    groups = k // 32
    if bits == 4:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        offset = torch.randn(n, groups, generator=g) * 0.1
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        offset = None
    return codes, torch.rand(n, groups, generator=g) * 0.02 + 1e-3, offset


def _check_block_quant(impl, handle, ref, ref_handle, x, ids, what):
    """The kernel's product, float32 logits and gathered rows against the reference's dequantized weight."""
    exact = ref.weight(ref_handle).double()
    scale_of = (x.double() @ exact.T).abs().max().item()
    _close(impl.apply(handle, x.to(DEVICE)), ref.apply(ref_handle, x), x.dtype, what, scale_of)
    _logits_close(impl.logits(handle, x.to(DEVICE)), x.double() @ exact.T, scale_of, what)
    torch.testing.assert_close(impl.rows(handle, ids.to(DEVICE), torch.float64).cpu(), exact[ids],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (4, 8))
def test_block_quant_matches_reference(qops, bits, dtype):
    dt, impl, ref = DTYPES[dtype], qops.TritonBlockQuant(), LinearBlockQuant()
    for m, n, k in SHAPES:
        g = _gen(bits, m, n, k)
        codes, scale, offset = _block_weights(bits, n, k, g)
        assert impl.accepts(k, dt)
        handle = impl.prepare(codes.to(DEVICE), scale.to(DEVICE), None if offset is None else offset.to(DEVICE), bits)
        ref_handle = ref.prepare(codes, scale, offset, bits)
        x = torch.randn(m, k, generator=g).to(dt)
        _check_block_quant(impl, handle, ref, ref_handle, x, torch.tensor([[0, n - 1], [n // 2, 1]]),
                           f"triton linear_block_quant q{bits} {dtype} {m}x{k}->{n}")
    assert impl.greedy(handle, x.to(DEVICE)) is None
    packed_bytes = codes.numel() // 2 if bits == 4 else codes.numel()
    assert impl.nbytes(handle) == packed_bytes + scale.numel() * 4 * (2 if offset is not None else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_quant_affine_int8_matches_reference(qops, dtype):
    """GGUF K-quant sub-blocks: int8 codes with a float32 scale and offset per 16 or 32 inputs."""
    dt, impl, ref = DTYPES[dtype], qops.TritonBlockQuant(), LinearBlockQuant()
    for (m, n, k), group, with_offset in zip(SHAPES, (16, 32, 16, 16, 32), (True, True, False, True, True)):
        g = _gen(16, m, n, k, group)
        codes = torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
        offset = torch.randn(n, k // group, generator=g) * 0.1 if with_offset else None
        assert impl.accepts_affine(k, group, dt)
        handle = impl.prepare_affine(codes.to(DEVICE), scale.to(DEVICE),
                                     None if offset is None else offset.to(DEVICE), group)
        ref_handle = ref.prepare_affine(codes, scale, offset, group)
        x = torch.randn(m, k, generator=g).to(dt)
        _check_block_quant(impl, handle, ref, ref_handle, x, torch.tensor([[0, n - 1]]),
                           f"triton linear_block_quant affine group {group} offset {with_offset} {dtype} {m}x{k}->{n}")
    assert not impl.accepts_affine(80, 16, torch.bfloat16)  # the kernel's halves need whole groups of 32


def test_block_quant_packing_round_trips(qops):
    codes = torch.randint(0, 16, (3, 96), generator=_gen(4), dtype=torch.uint8)
    packed = qops.pack_4bit(codes)
    assert packed.shape == (3, 48) and torch.equal(qops.unpack_4bit(packed), codes)
    # Byte j of a group holds input j (low nibble) and input 16 + j (high nibble).
    assert packed[1, 16 + 5].item() == codes[1, 32 + 5].item() | (codes[1, 32 + 21].item() << 4)


def test_block_quant_takes_batched_and_strided_activations(qops):
    impl, ref = qops.TritonBlockQuant(), LinearBlockQuant()
    g = _gen(4, 2, 3)
    codes, scale, offset = _block_weights(4, 48, 64, g)
    handle, ref_handle = impl.prepare(codes, scale, offset, 4), ref.prepare(codes, scale, offset, 4)
    wide = torch.randn(2, 3, 96, generator=g)
    x = wide[..., 16:80]  # rows 96 apart: a view, as of a fused projection
    out = impl.apply(handle, x.to(DEVICE)).cpu()
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, ref.apply(ref_handle, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_matches_reference(qops, dtype):
    dt, impl, ref = DTYPES[dtype], qops.TritonFp8(), LinearFp8()
    for (m, n, k), group in zip(SHAPES, (64, 32, 64, 96, 128)):
        g = _gen(8, m, n, k, group)
        weight, scale = fp8_weights(n, k, group, g)
        if m == 1:  # e4m3 subnormals and signed zeros must decode too
            weight[0, :4] = torch.tensor([2 ** -9, -2 ** -7, 0.0, -0.0]).to(torch.float8_e4m3fn)
        assert impl.accepts(k, group, dt)
        handle, ref_handle = impl.prepare(weight.to(DEVICE), scale.to(DEVICE), group), ref.prepare(weight, scale, group)
        x = torch.randn(m, k, generator=g).to(dt)
        what = f"triton linear_fp8 {dtype} {m}x{k}->{n} group {group}"
        expected = ref.logits(ref_handle, x).double()
        scale_of = expected.abs().max().item()
        _close(impl.apply(handle, x.to(DEVICE)), ref.apply(ref_handle, x), dt, what, scale_of)
        _logits_close(impl.logits(handle, x.to(DEVICE)), expected, scale_of, what)
    assert impl.greedy(handle, x.to(DEVICE)) is None
    assert impl.nbytes(handle) == n * k + scale.numel() * 4


def test_fp8_decodes_every_code(qops):
    """All 254 finite e4m3fn codes through the kernel: row r of an identity-like product reads code r exactly."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes != 0x7F) & (codes != 0xFF)]  # the two NaNs
    n = codes.numel()
    weight = torch.zeros(n, 32, dtype=torch.uint8)
    weight[:, 0] = codes
    weight = weight.view(torch.float8_e4m3fn)
    impl = qops.TritonFp8()
    handle = impl.prepare(weight.to(DEVICE), torch.ones(n, 1, device=DEVICE), 32)
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    out = impl.logits(handle, x.to(DEVICE)).cpu()
    assert torch.equal(out[0], weight[:, 0].float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_reference(iops, dtype):
    dt, impl, ref = DTYPES[dtype], iops.TritonInt8(), LinearInt8()
    for (m, n, k), input_scale in zip(SHAPES, (None, None, 0.02, None, None)):
        g = _gen(8, m, n, k)
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.01 + 1e-4
        handle = impl.prepare(weight.to(DEVICE), scale.to(DEVICE), input_scale)
        ref_handle = ref.prepare(weight, scale, input_scale)
        x = torch.randn(m, k, generator=g).to(dt)
        what = f"triton linear_int8 {dtype} {m}x{k}->{n} input_scale {input_scale}"
        expected = ref.logits(ref_handle, x).double()
        scale_of = expected.abs().max().item()
        # Integer sums are exact; only the final scaling may round differently.
        _logits_close(impl.logits(handle, x.to(DEVICE)), expected, scale_of, what)
        _close(impl.apply(handle, x.to(DEVICE)), ref.apply(ref_handle, x), dt, what, scale_of)
    assert impl.greedy(handle, x.to(DEVICE)) is None
    assert impl.nbytes(handle) == n * k + n * 4


def test_int8_activation_codes_match_torch(iops):
    """Per-token codes and scales bit for bit, ties to even included (rows whose scale is exactly 1 or 1/2)."""
    g = _gen(127)
    x = torch.randn(6, 200, generator=g) * 3  # 200: one full and one partial block of the kernel's loop
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 126.5])
    x[0, 6:] = x[0, 6:].clamp(-100, 100)
    x[1] = 0.0  # all-zero token: the 1e-10 floor on the scale
    x[2, :3] = torch.tensor([63.5, 1.25, -0.75])
    x[2, 3:] = x[2, 3:].clamp(-60, 60)
    codes, scale = iops.quantize_int8(x.to(DEVICE))
    want_codes, want_scale = quantize_int8_per_token(x)
    assert torch.equal(scale.cpu(), want_scale[:, 0])
    assert torch.equal(codes.cpu(), want_codes)
    assert codes[0, :6].tolist() == [127, 2, -4, 0, 0, 126]
    static, ones = iops.quantize_int8(x.to(DEVICE), 0.5)
    assert torch.equal(static.cpu(), torch.round(x / 0.5).clamp(-128, 127).to(torch.int8))
    assert torch.equal(ones.cpu(), torch.full((6,), 0.5))


def test_ops_are_registered_for_cuda_only_and_say_why_not_here():
    from pagoda.platforms import resolve_platform
    from pagoda.platforms.cuda import CudaPlatform
    from pagoda.plugins.registry import get_registry

    ops = get_registry().ops
    for op in ("linear_block_quant", "linear_fp8", "linear_int8"):
        cls = ops[op]["triton"]
        assert cls.platforms == ("cuda",) and cls.priority == 10 and "package:triton" in cls.requires
        here = resolve_platform("auto")
        if here is not CudaPlatform:
            assert "runs on cuda" in cls.unavailable_reason(here)


COMPILE = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from types import SimpleNamespace
    from pagoda.platforms import cuda_int8_ops, cuda_quant_ops

    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    k = SimpleNamespace(**vars(cuda_quant_ops.kernels()), **vars(cuda_int8_ops.kernels()))
    tiles = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    jobs = [  # (kernel, argument types, constexprs)
        (k.block_quant, dict(x_ptr="*bf16", codes_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", out_ptr="*bf16"),
         dict(BITS=4, HAS_OFFSET=True, GROUP=32, DOT_FP32=False, **tiles)),
        (k.block_quant, dict(x_ptr="*bf16", codes_ptr="*i8", scale_ptr="*fp32", offset_ptr="*fp32", out_ptr="*fp32"),
         dict(BITS=8, HAS_OFFSET=False, GROUP=32, DOT_FP32=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)),
        (k.block_quant, dict(x_ptr="*bf16", codes_ptr="*i8", scale_ptr="*fp32", offset_ptr="*fp32", out_ptr="*bf16"),
         dict(BITS=8, HAS_OFFSET=True, GROUP=16, DOT_FP32=False, **tiles)),
        (k.fp8, dict(x_ptr="*fp16", w_ptr="*u8", scale_ptr="*fp32", out_ptr="*fp16"),
         dict(GROUP=128, DOT_FP32=False, **tiles)),
        (k.fp8, dict(x_ptr="*fp32", w_ptr="*u8", scale_ptr="*fp32", out_ptr="*fp32"),
         dict(GROUP=96, DOT_FP32=True, **tiles)),
        (k.quantize_int8, dict(x_ptr="*bf16", codes_ptr="*i8", scale_ptr="*fp32", static_scale="fp32"),
         dict(STATIC=False, BLOCK=1024)),
        (k.int8_matmul, dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp32", out_ptr="*bf16"),
         dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)),
    ]
    for fn, types, consts in jobs:
        order = list(fn.arg_names)
        signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in order}
        constexprs = {(order.index(name),): value for name, value in consts.items()}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert compiled.asm, fn.__name__
    print("ok")
''')


@pytest.mark.parametrize("arch", (80, 90))
def test_kernels_compile_for_nvidia_gpus(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile from scratch, not from an earlier run's cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default both compilers use today, stated to silence its warning
    result = subprocess.run([sys.executable, "-c", COMPILE, str(arch)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
