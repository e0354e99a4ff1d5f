"""The CUDA platform's Triton ``linear_codebook`` kernel (AQLM) against the torch reference.

As in ``test_triton_quant_ops.py``: without a GPU the kernel runs on CPU tensors through Triton's interpreter, and
is also compiled ahead of time for sm_80 and sm_90 in a subprocess; with a GPU the same tests run it there.
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

from pagoda.ops.reference_quant import LinearCodebook  # noqa: E402
from tests.ops.quant_op_cases import linear_codebook  # noqa: E402
from tests.ops.triton_kernels import fresh_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def cops():
    return fresh_kernels("cuda_codebook_ops", "kernel")


class _OnDevice:
    """The implementation with its tensors on DEVICE, for the CPU-tensor op cases."""

    def __init__(self, impl):
        self.impl = impl

    def prepare(self, codes, codebooks, scales, shard_sizes=None):
        return self.impl.prepare(codes.to(DEVICE), codebooks.to(DEVICE), scales.to(DEVICE), shard_sizes)

    def apply(self, handle, x):
        return self.impl.apply(handle, x.to(DEVICE)).cpu()

    def logits(self, handle, x):
        return self.impl.logits(handle, x.to(DEVICE)).cpu()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_codebook_matches_reference(cops, dtype):
    """1x16 and 2x8 codes (and 3-bit ones), merged layers whose shards have their own books, a partial K tile
    (104 inputs); the output-group-2 cases keep the reference's form."""
    linear_codebook(_OnDevice(cops.TritonCodebook()), LinearCodebook(), dtype)


def test_codes_stay_compact_and_signed_16_bit_codes_decode(cops):
    impl, ref = cops.TritonCodebook(), LinearCodebook()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1 << 16, (16, 4, 1), generator=g)
    codes[0, 0, 0], codes[1, 0, 0] = (1 << 16) - 1, 1 << 15  # stored as -1 and -32768
    books = torch.randn(1, 1 << 16, 1, 8, generator=g).half()
    scales = torch.rand(16, 1, 1, 1, generator=g).half()
    handle = impl.prepare(codes.to(DEVICE), books.to(DEVICE), scales.to(DEVICE))
    assert handle.codes.dtype == torch.int16 and handle.books.dtype == torch.float16
    assert impl.nbytes(handle) == 16 * 4 * 2 + (1 << 16) * 8 * 2 + 16 * 4 + 16 * 4
    x = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(impl.logits(handle, x.to(DEVICE)).cpu(), ref.logits(ref.prepare(codes, books, scales), x),
                               rtol=1e-5, atol=1e-5)
    small = impl.prepare(codes[:, :, :1] % 256, books[:, :256], scales)
    assert small.codes.dtype == torch.uint8


def test_registered_for_cuda_only_and_says_why_not_here():
    from pagoda.platforms import resolve_platform
    from pagoda.platforms.cuda import CudaPlatform
    from pagoda.plugins.registry import get_registry

    cls = get_registry().ops["linear_codebook"]["triton"]
    assert cls.platforms == ("cuda",) and "package:triton" in cls.requires
    here = resolve_platform("auto")
    if here is not CudaPlatform:
        assert "runs on cuda" in cls.unavailable_reason(here)


COMPILE = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pagoda.platforms.cuda_codebook_ops import kernel

    fn = kernel()
    for x, codes, books, out, num_books, mask, fp32 in (("*bf16", "*u8", "*fp16", "*bf16", 2, 255, False),
                                                         ("*fp16", "*i16", "*fp32", "*fp32", 1, 65535, True)):
        types = dict(x_ptr=x, codes_ptr=codes, books_ptr=books, shard_ptr="*i32", scale_ptr="*fp32", out_ptr=out)
        consts = dict(NUM_BOOKS=num_books, CODE_MASK=mask, DOT_FP32=fp32, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
        order = list(fn.arg_names)
        signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in order}
        constexprs = {(order.index(name),): value for name, value in consts.items()}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", int(sys.argv[1]), 32))
        assert compiled.asm
    print("ok")
''')


@pytest.mark.parametrize("arch", (80, 90))
def test_kernel_compiles_for_nvidia_gpus(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", COMPILE, str(arch)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
