"""The CPU platform's implementations of the FP8 and INT8 (W8A8) linear ops.

- ``linear_fp8`` / ``cpu_avx512_bf16``: FP8 e4m3 codes packed in the block-quantized layout (groups of 64 inputs,
  a float32 scale each) and multiplied with bf16 activations by pagoda's kernel, which widens each code to bf16
  in registers — exact products, 1.06 bytes a weight, no dense copy.
- ``linear_int8`` / ``cpu_onednn``: oneDNN's int8 GEMM through torch (VNNI, or AMX-INT8 tiles where the CPU has
  them) on its prepacked weight; activations quantized per token, the product scaled per token and channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops.interface import OpImpl
from pagoda.ops.reference_quant import quantize_int8_per_token
from pagoda.platforms.cpu.kernels import cpu_ops
from pagoda.platforms.cpu.ops import _NativeBf16Gemm


class PackedFp8(_NativeBf16Gemm):
    op, name = "linear_fp8", "cpu_avx512_bf16"

    def accepts(self, in_features, group, act_dtype):
        return (in_features % cpu_ops.E4M3_GROUP == 0 and group % cpu_ops.E4M3_GROUP == 0
                and act_dtype == torch.bfloat16)

    def prepare(self, weight, scale, group):
        return cpu_ops.pack_fp8(weight, scale.float().repeat_interleave(group // cpu_ops.E4M3_GROUP, dim=1))

    def apply(self, handle, x):
        return cpu_ops.quant_linear(x, handle)

    def logits(self, handle, x):
        return cpu_ops.quant_linear(x, handle, float_output=True)

    def greedy(self, handle, x):
        return None

    def nbytes(self, handle):
        return handle.data.numel()


@dataclass
class _OneDnnInt8:
    packed: torch.Tensor  # oneDNN's prepacked int8 weight
    scale: torch.Tensor  # float32 [n]
    zero: torch.Tensor  # int64 [n] zeros
    input_scale: float | None
    n: int
    k: int


class OneDnnInt8(OpImpl):
    op, name = "linear_int8", "cpu_onednn"
    platforms = ("cpu",)
    requires = ("avx512_vnni",)
    priority = 10

    @classmethod
    def check(cls, platform) -> str | None:
        if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            return "this torch build has no oneDNN int8 linear"
        return None

    def accepts(self, in_features, act_dtype):
        return True

    def prepare(self, weight, scale, input_scale=None):
        n, k = weight.shape
        packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        return _OneDnnInt8(packed, scale.float().contiguous(), torch.zeros(n, dtype=torch.int64), input_scale, n, k)

    def _matmul(self, handle, x):
        x2 = x.reshape(-1, handle.k)
        if handle.input_scale is None:
            codes, token_scale = quantize_int8_per_token(x2)
        else:
            codes = torch.round(x2.float() / handle.input_scale).clamp(-128, 127).to(torch.int8)
            token_scale = handle.input_scale
        # Integer sums times the weight scales, in float32; then each token's own scale.
        y = torch.ops.onednn.qlinear_pointwise.default(codes, 1.0, 0, handle.packed, handle.scale, handle.zero, None,
                                                       1.0, 0, torch.float32, "none", [], "")
        return (y * token_scale).reshape(*x.shape[:-1], handle.n)

    def apply(self, handle, x):
        return self._matmul(handle, x).to(x.dtype)

    def logits(self, handle, x):
        return self._matmul(handle, x)

    def greedy(self, handle, x):
        return None

    def nbytes(self, handle):
        return handle.n * handle.k + handle.n * 4


CPU_QUANT_OP_IMPLS = [PackedFp8, OneDnnInt8]
