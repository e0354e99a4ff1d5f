"""FP8 (float8_e4m3fn) weights: vLLM's own ``fp8`` method, and the FP8 schemes of compressed-tensors.

A layer's checkpoint holds ``weight`` float8_e4m3fn [N, K] and a float32 scale that multiplies it: per tensor
(``weight_scale``, one value), per output channel ([N, 1]), or per 128×128 block (``weight_scale_inv`` [N/128,
K/128] in vLLM's format — a multiplier despite its name). The ``linear_fp8`` op multiplies by the FP8 codes as
they are (no dense copy is kept) with a scale per row and group of inputs, so the shards of a merged layer keep
their own per-tensor scales: vLLM requantizes them to the largest (its kernels take one scale per tensor), which
costs accuracy and buys nothing here.

Activations stay in the model's dtype, as in transformers: FP8 × bf16 products are exact, and the CPU has no FP8
arithmetic to gain from rounding them. A static scheme's ``input_scale`` is loaded and checked, not applied.

With ``--quantization fp8`` on a dense checkpoint, each layer is quantized on load with one per-tensor scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.ops import current_ops
from pagoda.ops.reference_quant import FP8_MAX
from pagoda.quantization.checkpoint_linear import (CheckpointLinearMethod, expect_dtype, expect_shape,
                                                   matches_module)
from pagoda.quantization.int_kernels import OpKernel
from pagoda.quantization.tensor_parallel import WHOLE, TensorLayout
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


def fp8_kernel(weight: torch.Tensor, scale: torch.Tensor, group: int) -> OpKernel:
    op = current_ops().linear_fp8
    return OpKernel(op, op.prepare(weight, scale, group), *weight.shape)


def to_fp8(w: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class Fp8LinearMethod(CheckpointLinearMethod):
    """``strategy``: "tensor", "channel" or "block" (with ``block`` = (rows, cols)); ``scale_name``: the scale
    tensor's name in the checkpoint; ``static_input``: whether an ``input_scale`` is stored; ``quantize``: the
    checkpoint is dense and is quantized here."""

    def __init__(self, prefix: str, strategy: str, block: tuple[int, int] | None = None,
                 scale_name: str = "weight_scale", static_input: bool = False, quantize: bool = False):
        super().__init__(prefix)
        self.strategy, self.block, self.scale_name = strategy, block, scale_name
        self.static_input, self.quantize = static_input, quantize

    def tensor_names(self) -> tuple[str, ...]:
        if self.quantize:
            return ("weight",)
        return ("weight", self.scale_name) + (("input_scale",) if self.static_input else ())

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        # Block scales cover 128x128 tiles: a rank must hold whole tiles. A dense checkpoint quantized on load
        # gets one scale per rank, from the rank's part.
        scale = {"tensor": WHOLE, "channel": TensorLayout(0)}.get(self.strategy)
        if scale is None:
            scale = TensorLayout(0, self.block[0], 1, self.block[1])
        return {"weight": TensorLayout(0, 1, 1, 1), self.scale_name: scale, "input_scale": WHOLE}

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        k = layer.input_size
        if self.quantize:
            dense = torch.cat([s["weight"] for s in shards]) if len(shards) > 1 else shards[0]["weight"]
            expect_shape(self.prefix, "weight", dense, (sum(layer.output_sizes), k))
            scale = dense.abs().amax().float().clamp(min=1e-12) / FP8_MAX
            return [fp8_kernel(to_fp8(dense, scale), scale.expand(dense.shape[0], 1), k)]
        weights, scales = [], []
        for n, tensors in zip(layer.output_sizes, shards):
            weight = tensors["weight"]
            expect_dtype(self.prefix, "weight", weight, torch.float8_e4m3fn)
            expect_shape(self.prefix, "weight", weight, (n, k), "out_features, in_features")
            weights.append(weight)
            scales.append(self._scale(tensors[self.scale_name].float(), n, k))
        if self.static_input:
            for index, tensors in enumerate(shards):
                if not torch.isfinite(tensors["input_scale"].float()).all() or tensors["input_scale"].numel() != 1:
                    raise ValueError(f"{self.prefix}.input_scale (shard {index}): expected one finite value")
        group = k if self.strategy != "block" else self.block[1]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        scale = torch.cat(scales) if len(scales) > 1 else scales[0]
        return [fp8_kernel(weight.contiguous(), scale.contiguous(), group)]

    def _scale(self, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """The shard's scale as [n, K / group] float32."""
        name = f"{self.prefix}.{self.scale_name}"
        if self.strategy == "tensor":
            if scale.numel() != 1:
                raise ValueError(f"{name}: a per-tensor scale has one value, the checkpoint has {tuple(scale.shape)}")
            return scale.reshape(1, 1).expand(n, 1)
        if self.strategy == "channel":
            if scale.numel() != n:
                raise ValueError(f"{name}: a per-channel scale has {n} values, the checkpoint has "
                                 f"{tuple(scale.shape)}")
            return scale.reshape(n, 1)
        bn, bk = self.block
        if k % bk:
            raise ValueError(f"{self.prefix}: block size {bk} does not divide the input size {k}")
        expect_shape(self.prefix, self.scale_name, scale, (-(-n // bn), k // bk), f"blocks of {bn}x{bk}")
        return scale.repeat_interleave(bn, dim=0)[:n]


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, serialized: bool, static_input: bool, ignored: list[str], block: tuple[int, int] | None):
        self.serialized, self.static_input, self.ignored, self.block = serialized, static_input, ignored, block

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        serialized = "fp8" in str(config.get("quant_method", ""))
        if not serialized:  # a dense checkpoint quantized on load (--quantization fp8)
            return cls(False, False, [], None)
        scheme = config.get("activation_scheme")
        if scheme not in ("static", "dynamic"):
            raise ValueError(f"quantization_config.activation_scheme must be 'static' or 'dynamic', got {scheme!r}")
        block = config.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or scheme != "dynamic":
                raise ValueError("quantization_config.weight_block_size: block scales take two sizes and the "
                                 f"dynamic activation scheme; got {block} with {scheme}")
            block = (int(block[0]), int(block[1]))
        ignored = list(config.get("ignored_layers") or []) + list(config.get("modules_to_not_convert") or [])
        return cls(True, scheme == "static", ignored, block)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if matches_module(prefix, self.ignored):
            return UnquantizedLinearMethod()
        if not self.serialized:
            return Fp8LinearMethod(prefix, "tensor", quantize=True)
        if self.block is not None:
            return Fp8LinearMethod(prefix, "block", self.block, "weight_scale_inv")
        return Fp8LinearMethod(prefix, "tensor", static_input=self.static_input)

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


@hookimpl
def pagoda_register_quantization_methods():
    return [Fp8Config]
