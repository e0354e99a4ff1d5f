"""AWQ checkpoints (AutoAWQ's "gemm" layout; gptqmodel writes the same), as vLLM's ``awq`` method.

Per linear layer: ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [K/g, N/8] (4-bit codes packed along the
outputs, in AutoAWQ's interleaved nibble order), ``scales`` [K/g, N] float16/bfloat16; ``w = (q - z) * s``.
Layers named in ``modules_to_not_convert`` stay dense, as do the embedding and the LM head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.quantization.checkpoint_linear import (AffineWeight, CheckpointLinearMethod, affine_kernels,
                                                   expect_dtype, expect_shape, matches_module)
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.packing import unpack_awq
from pagoda.quantization.tensor_parallel import TensorLayout
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


class AWQLinearMethod(CheckpointLinearMethod):
    def __init__(self, prefix: str, group_size: int, zero_point: bool):
        super().__init__(prefix)
        self.group_size, self.zero_point = group_size, zero_point

    def tensor_names(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales") if self.zero_point else ("qweight", "scales")

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        # Codes and zeros pack 8 outputs per int32 (interleaved within the word, so a rank takes whole words);
        # one group over all inputs (group_size -1) serves every rank's inputs alike.
        group = (0, self.group_size) if self.group_size > 0 else (None, 1)
        return {"qweight": TensorLayout(1, 8, 0, 1), "qzeros": TensorLayout(1, 8, *group),
                "scales": TensorLayout(1, 1, *group)}

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        k = layer.input_size
        group = self.group_size if self.group_size > 0 else k
        if k % group:
            raise ValueError(f"{self.prefix}: group_size {group} does not divide the input size {k}")
        decoded = []
        for n, tensors in zip(layer.output_sizes, shards):
            if n % 8:
                raise ValueError(f"{self.prefix}: AWQ packs 8 outputs per int32; {n} outputs is not a multiple of 8")
            qweight, scales = tensors["qweight"], tensors["scales"]
            expect_dtype(self.prefix, "qweight", qweight, torch.int32)
            expect_shape(self.prefix, "qweight", qweight, (k, n // 8), "in_features, out_features / 8")
            expect_shape(self.prefix, "scales", scales, (k // group, n), f"in_features / group_size {group}, out")
            scale = scales.float().t().contiguous()  # [N, G]
            codes = unpack_awq(qweight).t().contiguous().to(torch.uint8)  # [N, K]
            if self.zero_point:
                qzeros = tensors["qzeros"]
                expect_dtype(self.prefix, "qzeros", qzeros, torch.int32)
                expect_shape(self.prefix, "qzeros", qzeros, (k // group, n // 8), "in_features / group, out / 8")
                zeros = unpack_awq(qzeros).t().float()
            else:
                zeros = torch.full_like(scale, 8.0)
            decoded.append(AffineWeight(codes, scale, zeros, group, 4))
        return affine_kernels(decoded, layer.params_dtype)


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, bits: int, group_size: int, zero_point: bool, modules_to_not_convert: list[str]):
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"quantization_config.bits: AWQ supports 4-bit weights, the checkpoint has {bits}")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version: AWQ layout {version!r} is not supported; supported: gemm")
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        if group <= 0 and group != -1:
            raise ValueError(f"quantization_config.group_size must be positive or -1, got {group}")
        return cls(bits, group, bool(config.get("zero_point", True)),
                   list(config.get("modules_to_not_convert") or []))

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if matches_module(prefix, self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(prefix, self.group_size, self.zero_point)

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


@hookimpl
def pagoda_register_quantization_methods():
    return [AWQConfig]
