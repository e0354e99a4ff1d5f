"""Plain-torch reference implementations of every op (built-in plugin).

They run on any platform torch runs on and define each op's numbers: the elementwise ops compute exactly as
transformers does, so float32 models stay token-for-token equal to it. Faster implementations elsewhere (the CPU
platform's native kernels, a third party's) are held to these by the op tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.ops.interface import OpImpl
from pagoda.ops.reference_attention import PagedDecodeAttention, PrefillAttention
from pagoda.ops.reference_lora import LORA_REFERENCE_IMPLS
from pagoda.ops.reference_moe import FusedMoE, MoeTopK
from pagoda.ops.reference_quant import QUANT_REFERENCE_IMPLS
from pagoda.plugins.hookspecs import hookimpl


class RmsNorm(OpImpl):
    op, name, is_reference = "rms_norm", "torch", True

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 unit_offset: bool = False):
        """``unit_offset`` (Gemma): the scale is ``1 + weight``, and the normalised value is multiplied by it in
        float32 before the one rounding to ``x``'s dtype (Llama rounds the normalised value first)."""
        if residual is not None:
            x = x + residual
            residual = x
        if unit_offset:
            xf = x.float()
            out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
        else:
            out = F.rms_norm(x, (x.shape[-1],), weight, eps)
        return out if residual is None else (out, residual)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of ``x`` [T, heads, d] by ``cos``/``sin`` [T, 1, rotary_dim] (sign folded into sin)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim != x.shape[-1]:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((rotate(rot, cos, sin), rest), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


class RotaryEmbedding(OpImpl):
    op, name, is_reference = "rotary_embedding", "torch", True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q`` [T, heads, d], ``k`` [T, kv_heads, d]; ``cos``/``sin`` float32 [T, rotary_dim] with rotate-half's
        sign folded into ``sin``. Returns the rotated ``(q, k)`` (an implementation may rotate in place). The
        rotation runs in the activations' dtype, as the reference model implementations do."""
        cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)
        return rotate(q, cos, sin), rotate(k, cos, sin)


class SiluAndMul(OpImpl):
    op, name, is_reference = "silu_and_mul", "torch", True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(OpImpl):
    op, name, is_reference = "gelu_and_mul", "torch", True

    def __call__(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=approximate) * up


class LayerNorm(OpImpl):
    op, name, is_reference = "layer_norm", "torch", True

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                 residual: torch.Tensor | None = None):
        """LayerNorm of ``x`` [rows, hidden] (``weight``/``bias`` [hidden] or None); with ``residual``, of
        ``x + residual`` (added in the activations' dtype, as the residual stream is), returning
        ``(out, x + residual)``."""
        if residual is not None:
            x = x + residual
            residual = x
        out = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return out if residual is None else (out, residual)


class Activation(OpImpl):
    op, name, is_reference = "activation", "torch", True
    #: activation names the op takes
    SUPPORTED = ("relu", "gelu", "gelu_tanh")

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``name`` applied elementwise: ``relu``, ``gelu`` (exact, erf) or ``gelu_tanh`` (the tanh approximation,
        GPT-2's ``gelu_new``)."""
        if name == "relu":
            return F.relu(x)
        if name in ("gelu", "gelu_tanh"):
            return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(self.SUPPORTED)}")


@dataclass
class DenseWeight:
    weight: torch.Tensor  # [n, k]
    bias: torch.Tensor | None


class LinearDense(OpImpl):
    """A dense weight, prepared once after loading (on its device) and multiplied by each call."""

    op, name, is_reference = "linear_dense", "torch", True
    #: Whether the handle is the caller's own parameters, read at every call (so the caller keeps them registered:
    #: weight streaming and state dicts see them); otherwise the caller drops them once prepared.
    keeps_weight = True

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> DenseWeight:
        """The implementation's form of ``weight`` [n, k] (and ``bias`` [n]), made once after loading, on the
        weight's device."""
        return DenseWeight(weight, bias)

    def prepare_lm_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> DenseWeight:
        """:meth:`prepare` for an LM head's weight: implementations whose :meth:`greedy` reads a form of its own
        (a screened copy) build it here as well."""
        return self.prepare(weight, bias)

    def apply(self, handle: DenseWeight, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` in ``x``'s dtype."""
        return F.linear(x, handle.weight, handle.bias)

    def logits(self, handle: DenseWeight, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` as float32 (an LM head)."""
        return F.linear(x, handle.weight, handle.bias).float()

    def greedy(self, handle: DenseWeight, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        """``logits(x).argmax(-1)`` without writing the logits out, or None where this implementation can't (the
        caller then samples from :meth:`logits`; torch's own argmax is no faster than the sampler's). ``allowed``:
        a token bitmask per row (int32 [rows, ceil(n / 32)], bit ``t % 32`` of word ``t // 32`` set: token ``t``
        allowed); an implementation that gives an argmax gives it over the allowed tokens only."""
        return None

    def rows(self, handle: DenseWeight, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]`` (embedding lookups on a weight that also serves as the LM head)."""
        return F.embedding(ids, handle.weight)

    def nbytes(self, handle: DenseWeight) -> int:
        return sum(t.numel() * t.element_size() for t in (handle.weight, handle.bias) if t is not None)


@dataclass
class BlockQuantWeight:
    codes: torch.Tensor  # [n, k]: uint8 0..15 (4-bit) or int8
    scale: torch.Tensor  # float32 [n, k / group]
    offset: torch.Tensor | None  # float32 [n, k / group]: 4-bit codes, and int8 codes from prepare_affine
    bits: int
    group: int = 32


class LinearBlockQuant(OpImpl):
    """``w = code * scale + offset`` per group of 32 inputs. The reference dequantizes on every call: exact, and
    slow. Callers with a faster torch form of their own (GGUF's int4/int8 paths) keep it where only the
    reference was chosen."""

    op, name, is_reference = "linear_block_quant", "torch", True
    keeps_weight = False

    def accepts(self, in_features: int, act_dtype: torch.dtype) -> bool:
        """Whether :meth:`prepare` takes weights of ``in_features`` for activations of ``act_dtype``."""
        return in_features % 32 == 0

    def prepare(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                bits: int) -> BlockQuantWeight:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 8 and offset is not None:
            raise ValueError("8-bit codes take no offset")
        # 8-bit scales are float16 values (as Q8_0 stores them); rounding here keeps every implementation equal.
        scale = scale.float() if bits == 4 else scale.to(torch.float16).float()
        return BlockQuantWeight(codes, scale, None if offset is None else offset.float(), bits)

    def accepts_zero(self, in_features: int, group: int, act_dtype: torch.dtype, bits: int = 4) -> bool:
        """Whether :meth:`prepare_zero` takes ``bits``-bit weights with a zero point per ``group`` inputs."""
        return bits in (4, 8) and group % 32 == 0 and in_features % group == 0

    def prepare_zero(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                     bits: int = 4) -> BlockQuantWeight:
        """``codes`` [n, k] with ``w = (code - zero) * scale``, one ``scale``/``zero`` [n, k / group] per group (AWQ,
        GPTQ): 4-bit codes 0..15, or 8-bit codes as int8 (the checkpoint's codes and zeros less 128). The same op as
        :meth:`prepare` with ``offset = -zero * scale`` (exact in float32 for float16/bfloat16 scales and integer
        zeros); an implementation may keep the compact form."""
        if bits == 8:
            return BlockQuantWeight(codes.to(torch.int8), scale.float(), -(zero.float() * scale.float()), 8, group)
        per = group // 32
        scale, zero = scale.float().repeat_interleave(per, 1), zero.float().repeat_interleave(per, 1)
        return self.prepare(codes, scale, -(zero * scale), 4)

    def accepts_affine(self, in_features: int, group: int, act_dtype: torch.dtype) -> bool:
        """Whether :meth:`prepare_affine` takes int8 weights with a scale and offset per ``group`` inputs."""
        return group in (16, 32) and in_features % group == 0

    def prepare_affine(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                       group: int) -> BlockQuantWeight:
        """int8 ``codes`` [n, k] with ``w = code * scale + offset``, one float32 ``scale`` and ``offset``
        [n, k / group] per group of 16 or 32 inputs (GGUF's K-quant sub-blocks: Q2_K, Q5_K, Q6_K). Unlike
        :meth:`prepare`'s 8-bit form, scales keep float32 (products of two scales are not float16 values)."""
        if codes.dtype != torch.int8:
            raise ValueError(f"affine codes must be int8, got {codes.dtype}")
        if group not in (16, 32):
            raise ValueError(f"affine groups are 16 or 32 inputs, got {group}")
        return BlockQuantWeight(codes, scale.float(), None if offset is None else offset.float(), 8, group)

    @staticmethod
    def _dequant(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 group: int = 32) -> torch.Tensor:
        w = codes.float().unflatten(-1, (-1, group)) * scale.unsqueeze(-1)
        if offset is not None:
            w = w + offset.unsqueeze(-1)
        return w.flatten(-2)

    def weight(self, handle: BlockQuantWeight) -> torch.Tensor:
        """The dequantized float32 weight [n, k]."""
        return self._dequant(handle.codes, handle.scale, handle.offset, handle.group)

    def apply(self, handle: BlockQuantWeight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(handle).to(x.dtype))

    def logits(self, handle: BlockQuantWeight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight(handle))

    def greedy(self, handle: BlockQuantWeight, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return None

    def rows(self, handle: BlockQuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        offset = None if handle.offset is None else handle.offset[flat]
        w = self._dequant(handle.codes[flat], handle.scale[flat], offset, handle.group)
        return w.reshape(*ids.shape, -1).to(dtype)

    def nbytes(self, handle: BlockQuantWeight) -> int:
        return sum(t.numel() * t.element_size() for t in (handle.codes, handle.scale, handle.offset)
                   if t is not None)


class WriteKV(OpImpl):
    op, name, is_reference = "write_kv", "torch", True

    def __call__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` [tokens, kv_heads, d] into the caches [blocks, block_size, kv_heads, d] at the
        flat slots ``slot_mapping`` (int64)."""
        kv_heads, d = key.shape[1], key.shape[2]
        key_cache.view(-1, kv_heads, d).index_copy_(0, slot_mapping, key)
        value_cache.view(-1, kv_heads, d).index_copy_(0, slot_mapping, value)


REFERENCE_IMPLS = [RmsNorm, LayerNorm, Activation, RotaryEmbedding, SiluAndMul, GeluAndMul, LinearDense,
                   LinearBlockQuant, WriteKV, PagedDecodeAttention, PrefillAttention, FusedMoE, MoeTopK]


@hookimpl
def pagoda_register_ops():
    return REFERENCE_IMPLS + QUANT_REFERENCE_IMPLS + LORA_REFERENCE_IMPLS
