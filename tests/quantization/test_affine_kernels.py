"""Which compact kernel an integer weight with zero points gets, by what the engine's ``linear_block_quant`` op takes,
and that each multiplies exactly as the dequantized weight does."""

from __future__ import annotations

import pytest
import torch

from pagoda.platforms.cpu import ops as cpu_op_impls
from pagoda.platforms.cpu.kernels import cpu, cpu_quant_ops
from pagoda.quantization.int_kernels import BlockQuantKernel, OffsetBlockQuantKernel, affine_kernel

pytestmark = pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_packed_bf16),
                                reason="native bf16 kernels unavailable: "
                                       f"{cpu.unavailable_reason() or 'no AVX512-BF16'}")


class FourBitZerosOnly(cpu_op_impls.PackedBlockQuant):
    """An implementation that takes zero points with 4-bit codes only (as the Triton one takes none)."""

    def accepts_zero(self, in_features, group, act_dtype, bits=4):
        return bits == 4 and super().accepts_zero(in_features, group, act_dtype, bits)


def _weight(n: int, k: int, group: int):
    g = torch.Generator().manual_seed(n * k + group)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01).half().float()
    zero = torch.randint(-128, 128, (n, k // group), generator=g).float()
    exact = (codes.double().unflatten(1, (-1, group)) - zero.double()[..., None]) * scale.double()[..., None]
    return codes, scale, zero, exact.flatten(1)


@pytest.mark.parametrize("group,kind", [(32, cpu_quant_ops.ZERO8_KIND + 32), (128, cpu_quant_ops.ZERO8_KIND + 128),
                                        (576, cpu_quant_ops.ZERO8_KIND + 64)])
def test_eight_bit_zero_points_take_one_op_handle(group, kind):
    """8-bit GPTQ / W8A16 with zero points: the op's own kind, at the checkpoint's group (a larger group repeated per
    128, 64 or 32 inputs), so the layer is one op handle the fused decode step can run."""
    codes, scale, zero, exact = _weight(80, 1152, group)
    kernel = affine_kernel(codes, scale, zero, group, 8, torch.bfloat16, cpu_op_impls.PackedBlockQuant())
    assert isinstance(kernel, BlockQuantKernel) and kernel.handle.bits == kind
    # within a tenth of a checkpoint's bytes: the codes, float16 scales and 8-bit zeros
    assert kernel.nbytes() <= 1.1 * (codes.numel() + 3 * scale.numel())
    x = torch.randn(9, 1152, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = x.double() @ exact.T
    torch.testing.assert_close(kernel.matmul_float(x).double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


def test_offsets_beside_an_op_without_eight_bit_zero_points():
    """Where the op takes only plain 8-bit codes, the offsets are a product over each group's input sum beside it."""
    codes, scale, zero, exact = _weight(48, 256, 64)
    kernel = affine_kernel(codes, scale, zero, 64, 8, torch.bfloat16, FourBitZerosOnly())
    assert isinstance(kernel, OffsetBlockQuantKernel)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = x.double() @ exact.T
    torch.testing.assert_close(kernel.matmul_float(x).double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
    ids = torch.tensor([0, 47, 13])
    torch.testing.assert_close(kernel.rows(ids, torch.float32).double(), exact[ids], rtol=1e-6, atol=1e-7)
