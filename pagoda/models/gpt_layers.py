"""Building blocks of the GPT-style decoders (OPT, GPT-2): LayerNorm with a bias and a plain (non-gated)
activation, both through the engine's ops, and the mapping from a checkpoint's activation name to the op's.

Like the blocks in ``layers.py``, they capture :func:`pagoda.ops.current_ops` when built, so models never see
which implementation they got.
"""

from __future__ import annotations

import torch
from torch import nn

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
