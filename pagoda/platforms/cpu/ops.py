"""The CPU platform's op implementations: pagoda's native kernels, and oneDNN through torch where it is faster.

Each declares the CPU capabilities it needs and its priority, ranked by what was measured (the op table in
``docs/benchmarks.md``):

* ``linear_dense``: ``cpu_amx`` on CPUs with AMX-BF16 — pagoda's AMX tile GEMM on the packed weight for
  decode-sized batches (4-6x the AVX512-BF16 GEMM from 16 rows), oneDNN's AMX matmul on a prepacked copy for
  prefill-sized ones; ``cpu_avx512_bf16`` (the packed AVX512-BF16 GEMM alone) elsewhere.
* ``prefill_attention``: the native kernel ranks below torch's SDPA on AMX CPUs (whose flash attention runs on
  AMX) and above it elsewhere.
* The elementwise ops take bf16 only: float32 keeps torch's kernels, which match the reference bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops import reference
from pagoda.ops.interface import OpImpl
from pagoda.ops.reference_attention import DecodePlan, PrefillPlan
from pagoda.platforms.cpu.kernels import cpu, cpu_head, cpu_ops, cpu_quant_ops

#: Rows from which the AMX linear op hands the product to oneDNN (measured on a Xeon with AMX: oneDNN 1.8-2.6
#: TFLOP/s at 512-2048 rows against 1.1-1.8 for pagoda's tile kernel, which leads up to 64 rows).
ONEDNN_MIN_ROWS = 256

#: Sizes from which the native LayerNorm and ReLU beat torch's own kernels (bf16, measured on a Xeon with AMX; see
#: NativeLayerNorm and NativeActivation).
LAYER_NORM_MIN_ELEMENTS = 16 * 768
RELU_MIN_ELEMENTS = 32 * 3072

# The reference implementations the native ones hand the inputs their kernels don't take (layouts, head sizes).
_REFERENCE_ROTARY = reference.RotaryEmbedding()
_REFERENCE_WRITE_KV = reference.WriteKV()
_REFERENCE_PREFILL = reference.PrefillAttention()
_REFERENCE_LAYER_NORM = reference.LayerNorm()
_REFERENCE_ACTIVATION = reference.Activation()
_REFERENCE_GELU_AND_MUL = reference.GeluAndMul()


class _Native(OpImpl):
    platforms = ("cpu",)
    requires = ("avx512f",)
    priority = 10

    @classmethod
    def check(cls, platform) -> str | None:
        if cpu.kernels() is None:
            return f"native CPU kernels unavailable: {cpu.unavailable_reason()}"
        return None


class _NativeBf16Gemm(_Native):
    requires = ("avx512_bf16",)
    dtypes = (torch.bfloat16,)

    @classmethod
    def check(cls, platform) -> str | None:
        reason = super().check(platform)
        if reason is None and not cpu.kernels().has_packed_bf16:
            return "the native library was built without AVX512-BF16"
        return reason


class NativeRmsNorm(_Native):
    op, name, dtypes = "rms_norm", "cpu_native", (torch.bfloat16,)

    def __call__(self, x, weight, eps, residual=None, unit_offset=False):
        return cpu_ops.rms_norm(x, weight, eps, residual, unit_offset)


class NativeRotary(_Native):
    op, name, dtypes = "rotary_embedding", "cpu_native", (torch.bfloat16,)

    def __call__(self, q, k, cos, sin):
        """In place: ``q`` and ``k`` are views of a layer's fresh QKV output. Side by side in each row (as a fused
        QKV projection leaves them), both are rotated in one call."""
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return _REFERENCE_ROTARY(q, k, cos, sin)
        heads, d = q.shape[1], q.shape[2]
        if k.stride(0) == q.stride(0) and k.data_ptr() == q.data_ptr() + heads * d * q.element_size():
            cpu_ops.rotary_(q.as_strided((q.shape[0], heads + k.shape[1], d), q.stride()), cos, sin)
            return q, k
        return cpu_ops.rotary_(q, cos, sin), cpu_ops.rotary_(k, cos, sin)


class NativeSiluAndMul(_Native):
    op, name, dtypes = "silu_and_mul", "cpu_native", (torch.bfloat16,)

    def __call__(self, x):
        return cpu_ops.gated_activation(x, "silu")


class NativeGeluAndMul(_Native):
    """GeGLU: the tanh approximation natively (Gemma's ``gelu_pytorch_tanh``); exact (erf) gelu through torch."""

    op, name, dtypes = "gelu_and_mul", "cpu_native", (torch.bfloat16,)

    def __call__(self, x, approximate="none"):
        if approximate != "tanh":
            return _REFERENCE_GELU_AND_MUL(x, approximate)
        return cpu_ops.gated_activation(x, "gelu_tanh")


class NativeLayerNorm(_Native):
    """The fused LayerNorm(+residual) kernel from ``LAYER_NORM_MIN_ELEMENTS``; torch's own below, where one call
    costs more than the work (measured, bf16, 2 threads, hidden 768: torch 5.1 us against 6.8 at 1 row; the kernel
    1.2x faster from 16 rows, 1.4x at 2048)."""

    op, name, dtypes = "layer_norm", "cpu_native", (torch.bfloat16,)

    def __call__(self, x, weight, bias, eps, residual=None):
        if x.numel() < LAYER_NORM_MIN_ELEMENTS or any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
            return _REFERENCE_LAYER_NORM(x, weight, bias, eps, residual)
        return cpu_ops.layer_norm(x, weight.contiguous() if weight is not None else None,
                                  bias.contiguous() if bias is not None else None, eps, residual)


class NativeActivation(_Native):
    """gelu_tanh natively at every size (1.6x torch's at one row of 3072, 3-3.7x from 16 rows); relu natively from
    ``RELU_MIN_ELEMENTS`` (torch's is quicker on a single row, 1.2-1.4x slower from 64 rows); exact (erf) gelu
    through torch."""

    op, name, dtypes = "activation", "cpu_native", (torch.bfloat16,)

    def __call__(self, x, name):
        if name not in cpu_ops.NATIVE_ACTIVATIONS or (name == "relu" and x.numel() < RELU_MIN_ELEMENTS):
            return _REFERENCE_ACTIVATION(x, name)
        return cpu_ops.activation(x, name)


class PackedDense(_NativeBf16Gemm):
    """bf16 weights repacked for AVX512-BF16's pairwise dot product (:class:`cpu_ops.PackedWeight`)."""

    op, name = "linear_dense", "cpu_avx512_bf16"

    def prepare(self, weight, bias):
        return cpu_ops.pack_weight(weight, bias)

    def apply(self, handle, x):
        return cpu_ops.packed_linear(x, handle)

    def logits(self, handle, x):
        return cpu_ops.packed_linear(x, handle, float_output=True)

    def prepare_lm_head(self, weight, bias):
        handle = self.prepare(weight, bias)
        if bias is None:
            handle.screen = cpu_head.head_screen(weight)
        return handle

    def greedy(self, handle, x, allowed=None):
        return cpu_head.linear_argmax(x, handle, allowed=allowed) if handle.bias is None else None

    def rows(self, handle, ids):
        return handle.rows(ids)

    def nbytes(self, handle):
        return handle.nbytes()


@dataclass
class AmxWeight:
    packed: cpu_ops.PackedWeight  # AMX tiles from 8 rows, AVX512-BF16 below; fused decode reads it
    onednn: torch.Tensor  # oneDNN's blocked layout (torch.ops.mkldnn._reorder_linear_weight), from ONEDNN_MIN_ROWS
    bias: torch.Tensor | None  # bf16, for oneDNN


class AmxDense(_NativeBf16Gemm):
    """AMX-BF16 CPUs: pagoda's AMX tile GEMM on the packed weight for decode-sized batches (it reads the layout the
    AVX512-BF16 kernel reads, which also serves up to a few rows), and oneDNN's AMX matmul on its own prepacked copy
    from ONEDNN_MIN_ROWS rows (prefill), where oneDNN's blocking wins. Keeps both forms: twice the weight memory."""

    op, name, priority = "linear_dense", "cpu_amx", 20
    requires = ("amx_bf16", "avx512_bf16")

    @classmethod
    def check(cls, platform) -> str | None:
        reason = super().check(platform)
        if reason is None and not cpu.kernels().has_amx:
            return "the native library was built without AMX (its compiler did not target AMX-BF16)"
        if reason is None and not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (mkldnn)"
        return reason

    def prepare(self, weight, bias):
        weight = weight.contiguous()
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight)
        return AmxWeight(cpu_ops.pack_weight(weight, bias), onednn, None if bias is None else bias.detach())

    @staticmethod
    def _onednn(handle, x):
        """oneDNN's product for a prefill-sized ``x``, else None (the packed weight's kernels take it)."""
        k = handle.packed.k
        if x.numel() < ONEDNN_MIN_ROWS * k:
            return None
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k), handle.onednn, handle.bias, "none", [], "")
        return out if x.dim() == 2 else out.unflatten(0, x.shape[:-1])

    def apply(self, handle, x):
        out = self._onednn(handle, x)
        if out is not None:
            return out
        return cpu_ops.packed_linear(x, handle.packed, amx=True)

    def logits(self, handle, x):
        out = self._onednn(handle, x)
        if out is not None:
            return out.float()
        return cpu_ops.packed_linear(x, handle.packed, float_output=True, amx=True)

    def prepare_lm_head(self, weight, bias):
        handle = self.prepare(weight, bias)
        if bias is None:
            handle.packed.screen = cpu_head.head_screen(weight)
        return handle

    def greedy(self, handle, x, allowed=None):
        if handle.bias is not None:
            return None
        # From 8 rows the argmax kernel multiplies on AMX tiles (64 x 49152 x 576: 18.7 ms on AVX512-BF16); below,
        # an LM head's screen serves it (cpu_head).
        return cpu_head.linear_argmax(x, handle.packed, amx=True, allowed=allowed)

    def rows(self, handle, ids):
        return handle.packed.rows(ids)

    def nbytes(self, handle):
        return handle.packed.nbytes() + handle.onednn.numel() * handle.onednn.element_size()


class PackedBlockQuant(_NativeBf16Gemm):
    """4-bit codes (float32 scale and offset) or 8-bit codes (float16 scale) per 32 inputs, multiplied exactly
    with bf16 activations (:class:`cpu_ops.PackedQuant`; FP8, zero-point and int8 affine packing in
    :mod:`cpu_quant_ops`)."""

    op, name = "linear_block_quant", "cpu_avx512_bf16"
    uses_amx = False  # whether its GEMMs take AMX tiles (the fused decode step must agree)

    def accepts(self, in_features, act_dtype):
        return in_features % 32 == 0 and act_dtype == torch.bfloat16

    def prepare(self, codes, scale, offset, bits):
        return cpu_ops.pack_quantized(codes, scale, offset, bits)

    def accepts_zero(self, in_features, group, act_dtype, bits=4):
        return bits in (4, 8) and group % 32 == 0 and in_features % group == 0 and act_dtype == torch.bfloat16

    def prepare_zero(self, codes, scale, zero, group, bits=4):
        # The compact form keeps the checkpoint's float16 scales and zeros, per group of up to 128 (a larger group's
        # repeated per 128, 64 or 32 inputs, whichever divides it); scales that float16 can't hold exactly (bfloat16
        # ones out of its range) take the float32 form per 32: 4-bit scale and offset, or the int8 affine kind.
        exact = torch.equal(scale.to(torch.float16).float(), scale.float()) and \
            torch.equal(zero.to(torch.float16).float(), zero.float())
        if exact:
            sub = next(g for g in reversed(cpu_quant_ops.ZERO_GROUPS) if group % g == 0)
            scale, zero = scale.repeat_interleave(group // sub, 1), zero.repeat_interleave(group // sub, 1)
            return cpu_quant_ops.pack_zero_point(codes, scale, zero, sub, bits)
        scale, zero = (t.float().repeat_interleave(group // 32, 1) for t in (scale, zero))
        offset = -(zero * scale)
        return self.prepare_affine(codes, scale, offset, 32) if bits == 8 else self.prepare(codes, scale, offset, 4)

    def accepts_affine(self, in_features, group, act_dtype):
        return group in cpu_ops.AFFINE_GROUPS and in_features % group == 0 and act_dtype == torch.bfloat16

    def prepare_affine(self, codes, scale, offset, group):
        offset = torch.zeros_like(scale, dtype=torch.float32) if offset is None else offset
        return cpu_quant_ops.pack_affine_int8(codes, scale, offset, group)

    def apply(self, handle, x):
        return cpu_ops.quant_linear(x, handle)

    def logits(self, handle, x):
        return cpu_ops.quant_linear(x, handle, float_output=True)

    def greedy(self, handle, x, allowed=None):
        return cpu_head.linear_argmax(x, handle, allowed=allowed)

    def rows(self, handle, ids, dtype):
        return handle.rows(ids, dtype)

    def nbytes(self, handle):
        return handle.data.numel()


class AmxTiles:
    """Mixin of the implementations that run pagoda's AMX tile kernels: the CPU's AMX-BF16, granted to this process,
    and a library built with them."""

    name, priority = "cpu_amx", 20
    requires = ("amx_bf16", "avx512_bf16")
    uses_amx = True

    @classmethod
    def check(cls, platform) -> str | None:
        reason = super().check(platform)
        if reason is None and not cpu.kernels().has_amx:
            return "the native library was built without AMX"
        return reason


class AmxBlockQuant(AmxTiles, PackedBlockQuant):
    """The same packed weights, with batches of 8 rows and more on AMX tiles: each group's codes are decoded into bf16
    tiles (exactly) and the group's sums taken for up to 64 rows at once (prefill, large decode batches)."""

    def apply(self, handle, x):
        return cpu_ops.quant_linear(x, handle, amx=True)

    def logits(self, handle, x):
        return cpu_ops.quant_linear(x, handle, float_output=True, amx=True)

    def greedy(self, handle, x, allowed=None):
        return cpu_head.linear_argmax(x, handle, amx=True, allowed=allowed)


class NativeWriteKV(_Native):
    op, name = "write_kv", "cpu_native"

    def __call__(self, key_cache, value_cache, key, value, slot_mapping):
        if not cpu_ops.write_kv(key_cache, value_cache, key, value, slot_mapping):
            _REFERENCE_WRITE_KV(key_cache, value_cache, key, value, slot_mapping)  # a layout the row copy can't take


class NativeDecodeAttention(_Native):
    """Reads the paged cache in place through the block table: no gather, no mask."""

    op, name, dtypes = "paged_decode_attention", "cpu_native", tuple(cpu.DTYPE_CODES)

    def plan(self, block_table, seq_lens, seq_lens_cpu, block_size, sliding_window):
        return DecodePlan(block_table, seq_lens, sliding_window)

    def run(self, query, key_cache, value_cache, plan, scale, soft_cap=None):
        out = cpu_ops.decode_attention(query, key_cache, value_cache, plan.block_table, plan.seq_lens, scale,
                                       plan.sliding_window, soft_cap)
        if out is None:
            raise RuntimeError(f"the native decode kernel rejected query {query.dtype} {tuple(query.shape)}, cache "
                               f"{key_cache.dtype} {tuple(key_cache.shape)} strides {key_cache.stride()}")
        return out


class NativePrefillAttention(_NativeBf16Gemm):
    """Every prefill chunk of a step in one call, reading keys and values in place from the cache."""

    op, name = "prefill_attention", "cpu_avx512_bf16"

    @classmethod
    def rank(cls, platform) -> int:
        return -10 if "amx_bf16" in platform.capabilities() else cls.priority

    @classmethod
    def rank_note(cls, platform) -> str | None:
        if "amx_bf16" in platform.capabilities():
            return "on AMX CPUs torch's SDPA (flash attention on AMX tiles) measured 1.5-2x faster"
        return None

    def plan(self, block_table, query_start_loc, seq_lens, query_start_loc_cpu, seq_lens_cpu, num_computed_cpu,
             block_size, sliding_window):
        return _REFERENCE_PREFILL.plan(block_table, query_start_loc, seq_lens, query_start_loc_cpu, seq_lens_cpu,
                                       num_computed_cpu, block_size, sliding_window)

    def run(self, query, key, value, key_cache, value_cache, plan: PrefillPlan, scale, soft_cap=None):
        out = cpu_ops.prefill_attention(query, key_cache, value_cache, plan.block_table, plan.query_start_loc,
                                        plan.seq_lens, scale, plan.sliding_window, soft_cap)
        if out is None:  # a head size or layout the kernel doesn't take
            return _REFERENCE_PREFILL.run(query, key, value, key_cache, value_cache, plan, scale, soft_cap)
        return out


CPU_OP_IMPLS = [NativeRmsNorm, NativeLayerNorm, NativeActivation, NativeRotary, NativeSiluAndMul, NativeGeluAndMul,
                PackedDense, AmxDense, PackedBlockQuant, AmxBlockQuant, NativeWriteKV, NativeDecodeAttention,
                NativePrefillAttention]
