"""The CPU platform's implementations of the FP8 and INT8 (W8A8) linear ops.

- ``linear_fp8`` / ``cpu_avx512_bf16``: FP8 e4m3 codes packed in the block-quantized layout (groups of 64 inputs,
  a float32 scale each) and multiplied with bf16 activations by pagoda's kernel, which widens each code to bf16
  in registers — exact products, 1.06 bytes a weight, no dense copy.
- ``linear_int8`` / ``cpu_onednn``: oneDNN's int8 GEMM through torch on its prepacked weight; activations quantized
  per token, the product scaled per token and channel. Below pagoda's kernels: on the AMD EPYC Zen 4 torch's oneDNN
  runs its scalar reference int8 kernel, seconds per layer call.
- ``linear_int8`` / ``cpu_avx512_vnni``: pagoda's AVX512-VNNI GEMM with the per-token quantization in the same
  call; ``cpu_amx``: the same on AMX-INT8 tiles.
- ``linear_codebook`` / ``cpu_native``: AQLM codes against tabulated dot products (one or two rows, books of up to
  256 entries), column tiles decoded to bf16 for other bf16 batches, tiles built in registers from the codebooks for
  float32 logits of up to 16 rows; ``cpu_amx``: the same, column tiles on AMX tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops import reference_quant as reference
from pagoda.ops.interface import OpImpl
from pagoda.ops.reference_quant import quantize_int8_per_token
from pagoda.platforms.cpu.kernels import cpu, cpu_ops, cpu_quant_ops
from pagoda.platforms.cpu.ops import AmxTiles, _NativeBf16Gemm


class PackedFp8(_NativeBf16Gemm):
    op, name = "linear_fp8", "cpu_avx512_bf16"
    uses_amx = False  # whether its GEMMs take AMX tiles (the fused decode step must agree)

    def accepts(self, in_features, group, act_dtype):
        g = cpu_quant_ops.E4M3_GROUP
        return (in_features % g == 0 and group % g == 0
                and act_dtype == torch.bfloat16)

    def prepare(self, weight, scale, group):
        per_64 = scale.float().repeat_interleave(group // cpu_quant_ops.E4M3_GROUP, dim=1)
        return cpu_quant_ops.pack_fp8(weight, per_64)

    def apply(self, handle, x):
        return cpu_ops.quant_linear(x, handle, amx=self.uses_amx)

    def logits(self, handle, x):
        return cpu_ops.quant_linear(x, handle, float_output=True, amx=self.uses_amx)

    def greedy(self, handle, x, allowed=None):
        return None

    def nbytes(self, handle):
        return handle.data.numel()


class AmxFp8(AmxTiles, PackedFp8):
    """The same packed FP8 weights, with batches of 8 rows and more on AMX tiles (codes decoded to bf16 tiles)."""


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

    def greedy(self, handle, x, allowed=None):
        return None

    def nbytes(self, handle):
        return handle.n * handle.k + handle.n * 4


@dataclass
class Int8Weight:
    packed: cpu_quant_ops.PackedInt8
    input_scale: float | None


class VnniInt8(_NativeBf16Gemm):
    """W8A8 with AVX512-VNNI (pagoda's kernel): the activations quantized per token in the same call, products summed
    in int32, one float32 scaling per output; 8 rows x 48 columns of accumulators, as the bf16 GEMM."""

    op, name = "linear_int8", "cpu_avx512_vnni"
    requires = ("avx512_vnni", "avx512_bf16")
    priority = 15
    uses_amx = False  # whether its GEMMs take AMX-INT8 tiles (the fused decode step must agree)
    built, isa = "has_vnni_int8", "AVX512-VNNI"  # the library's flag for this path, and what it was built with

    @classmethod
    def check(cls, platform) -> str | None:
        reason = super().check(platform)
        if reason is None and not getattr(cpu.kernels(), cls.built):
            return f"the native library was built without {cls.isa}"
        return reason

    def accepts(self, in_features, act_dtype):
        return True

    def prepare(self, weight, scale, input_scale=None):
        return Int8Weight(cpu_quant_ops.PackedInt8(weight, scale), input_scale)

    def _run(self, handle, x, float_output):
        return cpu_quant_ops.int8_linear(x, handle.packed, handle.input_scale, float_output, amx=self.uses_amx)

    def apply(self, handle, x):
        return self._run(handle, x, False)

    def logits(self, handle, x):
        return self._run(handle, x, True)

    def greedy(self, handle, x, allowed=None):
        return None

    def nbytes(self, handle):
        return handle.packed.data.numel()


class AmxInt8(VnniInt8):
    """The same packed weights on AMX-INT8 tiles."""

    name = "cpu_amx"
    requires = ("amx_int8", "amx_tile", "avx512_bf16")
    priority = 20
    uses_amx = True
    built, isa = "has_amx_int8", "AMX-INT8"


def _reference_form(handle: cpu_quant_ops.PackedCodebook) -> reference.CodebookWeight:
    """The reference's handle over the same codes (float32 activations, and float32 logits above
    ``CODEBOOK_MAX_ROWS`` rows), built per call: the dequantization it feeds costs far more than the conversion."""
    sizes = torch.diff(handle.shard_rows).tolist()
    return _REFERENCE_CODEBOOK.prepare(handle.unblocked_codes(), handle.books_by_entry().unsqueeze(3), handle.scales,
                                       sizes)


_REFERENCE_CODEBOOK = reference.LinearCodebook()


class NativeCodebook(_NativeBf16Gemm):
    """AQLM weights with one output and 8 inputs per code (1x16, 2x8 …), a merged layer's shards in one weight: one
    or two rows against books of up to 256 entries sum tabulated dot products; other bf16 batches decode one
    16-output column tile at a time into bf16 and multiply it by every row, so no call dequantizes the whole matrix;
    float32 logits of up to 16 rows build each 8-weight tile in a register from the codebooks. Float32 logits of a
    larger batch (an AQLM LM head scoring a prefill) and other shapes keep the reference's exact form."""

    op, name = "linear_codebook", "cpu_native"
    uses_amx = False  # whether batches above the decode size multiply on AMX tiles

    def prepare(self, codes, codebooks, scales, shard_sizes=None):
        books, sizes = reference.codebook_shards(codes, codebooks, shard_sizes)
        _, num_books, size, out_group, in_group = books.shape
        if out_group != 1 or in_group != 8 or size > 1 << 16:
            return _REFERENCE_CODEBOOK.prepare(codes, codebooks, scales, shard_sizes)
        return cpu_quant_ops.PackedCodebook(codes, books.squeeze(3), scales, sizes)

    def _run(self, handle, x, float_output):
        rows = x.reshape(-1, x.shape[-1])
        small = rows.shape[0] <= cpu_quant_ops.CODEBOOK_MAX_ROWS
        native = isinstance(handle, cpu_quant_ops.PackedCodebook)
        if native and (small or (x.dtype == torch.bfloat16 and not float_output)):
            out = cpu_quant_ops.codebook_linear(rows, handle, float_output, amx=self.uses_amx)
            return out.reshape(*x.shape[:-1], -1)
        ref_handle = _reference_form(handle) if native else handle
        return (_REFERENCE_CODEBOOK.logits(ref_handle, x) if float_output
                else _REFERENCE_CODEBOOK.apply(ref_handle, x))

    def apply(self, handle, x):
        return self._run(handle, x, False)

    def logits(self, handle, x):
        return self._run(handle, x, True)

    def greedy(self, handle, x, allowed=None):
        return None

    def nbytes(self, handle):
        if not isinstance(handle, cpu_quant_ops.PackedCodebook):
            return _REFERENCE_CODEBOOK.nbytes(handle)
        return handle.nbytes()


class AmxCodebook(AmxTiles, NativeCodebook):
    """The same AQLM weights, with batches above the decode size multiplied on AMX tiles."""


CPU_QUANT_OP_IMPLS = [PackedFp8, AmxFp8, OneDnnInt8, VnniInt8, AmxInt8, NativeCodebook, AmxCodebook]
