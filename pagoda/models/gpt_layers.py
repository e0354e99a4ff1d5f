"""Building blocks of the GPT-style decoders (OPT, GPT-2): LayerNorm with a bias and a plain (non-gated)
activation, both through the engine's ops, the mapping from a checkpoint's activation name to the op's, and the
declared ``"gpt"`` layer stack (:func:`gpt_decoder_stack`) that a platform may fuse.

Like the blocks in ``layers.py``, they capture :func:`pagoda.ops.current_ops` when built, so models never see
which implementation they got.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from pagoda.distributed.parallel_state import get_tp_group
from pagoda.models.interface import DecoderLayerSpec, DecoderStack
from pagoda.models.layers import stack_kernels
from pagoda.ops import current_ops
from pagoda.quantization.unquantized import default_weight_loader

#: Hugging Face ``activation_function`` names → the ``activation`` op's names. ``gelu_new`` is GPT-2's tanh
#: approximation, the same function as torch's ``gelu(approximate="tanh")``.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class LayerNorm(nn.Module):
    """LayerNorm (weight and bias optional: ``affine=False`` has neither), with an optional fused residual add:
    the ``layer_norm`` op. ``norm(x)`` → out; ``norm(x, residual)`` → ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, affine: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.bias = None
        if affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = default_weight_loader
            if bias:
                self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)
                self.bias.weight_loader = default_weight_loader
        self.op = current_ops().layer_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.op(x, self.weight, self.bias, self.eps, residual)


class Activation(nn.Module):
    """A non-gated activation named as a checkpoint's config names it (see :data:`ACTIVATIONS`): the
    ``activation`` op."""

    def __init__(self, hf_name: str) -> None:
        super().__init__()
        if hf_name not in ACTIVATIONS:
            raise ValueError(f"activation_function {hf_name!r} is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")
        self.name = ACTIVATIONS[hf_name]
        self.op = current_ops().activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.name)


class GptLayerParts(NamedTuple):
    """One pre-norm GPT-style layer's modules, in the order the layer runs them."""

    attention_norm: LayerNorm
    qkv: nn.Module  # a Linear with the fused [q; k; v] projection
    out: nn.Module
    attention: nn.Module  # layers.Attention
    mlp_norm: LayerNorm
    fc1: nn.Module
    activation: Activation
    fc2: nn.Module


def gpt_decoder_stack(layers: Sequence[GptLayerParts], hidden_size: int, attention_backend: str) -> DecoderStack | None:
    """The ``"gpt"`` :class:`DecoderStack` of pre-norm layers, or None where a layer is not one op call per part
    (a linear without a kernel handle) or the layers disagree on their norm epsilon or activation."""
    specs, lora_step = [], None
    for part in layers:
        kernels = stack_kernels((part.qkv, part.out, part.fc1, part.fc2), lora_step)
        if kernels is None:
            return None
        linears, lora, lora_step = kernels
        specs.append(DecoderLayerSpec(
            part.attention_norm.weight, part.mlp_norm.weight, *linears, part.attention.impl.sliding_window,
            lora if lora_step is not None else None, part.attention_norm.bias, part.mlp_norm.bias))
    epsilons = {n.eps for part in layers for n in (part.attention_norm, part.mlp_norm)}
    activations = {part.activation.name for part in layers}
    if len(epsilons) != 1 or len(activations) != 1:
        return None
    first: Any = layers[0]
    attn = first.attention
    return DecoderStack("gpt", specs, hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_size,
                        first.fc1.output_sizes[0], 0, epsilons.pop(), attn.impl.scale, activations.pop(),
                        attention_backend, None, current_ops(), get_tp_group().world_size, lora_step)
