"""Building blocks shared by model implementations.

Layers that hold weights take their storage and math from the quantization method (``Linear``,
``VocabEmbedding``); attention takes its math from the attention backend (``Attention``). Models never see
which ones they got.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.kernels import cpu_ops
from pagoda.quantization.interface import QuantizationConfig
from pagoda.quantization.unquantized import default_weight_loader


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored however the quantization method likes.

    ``output_sizes`` lists the shards of a merged layer (``[q, k, v]`` for ``qkv_proj``); checkpoints load each
    shard separately by index.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, quant_config: QuantizationConfig,
                 prefix: str, params_dtype: torch.dtype) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.prefix = prefix
        self.quant_method = quant_config.get_linear_method(prefix)
        self.quant_method.create_weights(self, input_size, self.output_sizes, bias, params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class VocabEmbedding(nn.Module):
    """Token embedding table; also computes logits when used as (or tied to) the LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_config: QuantizationConfig, prefix: str,
                 params_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.quant_method = quant_config.get_embedding_method(prefix)
        self.quant_method.create_weights(self, num_embeddings, embedding_dim, params_dtype)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.embed(self, token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.quant_method.logits(self, hidden)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax of :meth:`logits` per row, or None when only :meth:`logits` can give it."""
        return self.quant_method.greedy(self, hidden)


class RMSNorm(nn.Module):
    """RMSNorm (torch's fused kernel, which accumulates in float32), with an optional fused residual add."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if cpu_ops.native_elementwise(x):  # fused add + norm in one pass
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = F.rms_norm(x, self.shape, self.weight, self.eps)
        return out if residual is None else (out, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) with a precomputed cos/sin table indexed by position.

    One instance serves every layer: ``lookup(positions)`` gathers the step's cos/sin rows once, and each layer's
    ``forward`` applies them. The rotation runs in the model dtype, as the reference implementation does.
    """

    SUPPORTED = ("default", "linear", "llama3", "yarn")

    def __init__(self, config: Any, head_size: int, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in self.SUPPORTED:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                             f"{', '.join(self.SUPPORTED)}")
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rotary_dim = int(head_size * getattr(config, "partial_rotary_factor", 1.0))
        scaling = 1.0
        if rope_type == "default":
            inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        else:
            # The scaled variants' frequency formulas are exactly transformers'; reuse them so we match bit for bit.
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        max_positions = max(max_positions, int(params.get("original_max_position_embeddings") or 0))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rotary_dim = rotary_dim
        # sin carries rotate-half's sign: x*cos + rotate_half(x)*sin == x*cos + cat(x2, x1)*sin_signed.
        sin = (emb.sin() * scaling)
        sin[:, : rotary_dim // 2] *= -1
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        # The native kernel rotates with float32 sines (exact angles); the torch path with the model dtype's, as
        # the reference implementation does.
        self.native = dtype == torch.bfloat16
        if self.native:
            self.register_buffer("cos32", emb.cos() * scaling, persistent=False)
            self.register_buffer("sin32", sin, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin rows of a step's positions, shaped to broadcast over heads (float32 for the native
        kernel)."""
        if self.native and cpu_ops.native_elementwise(self.cos):
            return self.cos32[positions].unsqueeze(1), self.sin32[positions].unsqueeze(1)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """``q`` [T, heads, d], ``k`` [T, kv_heads, d] → rotated copies, with ``rope = lookup(positions)``."""
        cos, sin = rope
        if cos.dtype == torch.float32 and cpu_ops.native_elementwise(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            # In place: q and k are views of this layer's fresh QKV output. Side by side in each row (as a fused
            # QKV projection leaves them), both are rotated in one call.
            cos, sin = cos[:, 0], sin[:, 0]
            heads, d = q.shape[1], q.shape[2]
            if k.stride(0) == q.stride(0) and k.data_ptr() == q.data_ptr() + heads * d * q.element_size():
                cpu_ops.rotary_(q.as_strided((q.shape[0], heads + k.shape[1], d), q.stride()), cos, sin)
                return q, k
            return cpu_ops.rotary_(q, cos, sin), cpu_ops.rotary_(k, cos, sin)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim != x.shape[-1]:
            rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
            return torch.cat((self._rotate(rot, cos, sin), rest), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Paged attention for one layer, delegated to the selected attention backend's implementation."""

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int, backend: type[AttentionBackend],
                 config: AttentionConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.impl = backend.impl_cls()(num_heads, head_size, head_size ** -0.5, num_kv_heads, sliding_window, config)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        return self.impl.forward(q, k, v, kv_cache, metadata)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if cpu_ops.native_elementwise(x):
        return cpu_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
