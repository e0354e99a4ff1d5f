"""INT8 weights with INT8 activations (W8A8): compressed-tensors' ``int-quantized`` scheme.

Weights are int8 [N, K] with a float scale per output channel (or one per tensor); activations are quantized per
token on the fly (or with a static ``input_scale``), multiplied in integers by the ``linear_int8`` op and scaled
once per output — the platform's int8 GEMM (VNNI / AMX-INT8 on CPUs that have them) where one is registered.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.ops import current_ops
from pagoda.quantization.checkpoint_linear import CheckpointLinearMethod, expect_dtype, expect_shape
from pagoda.quantization.int_kernels import OpKernel
from pagoda.quantization.tensor_parallel import WHOLE, TensorLayout


def w8a8_kernel(weight: torch.Tensor, scale: torch.Tensor, input_scale: float | None) -> OpKernel:
    op = current_ops().linear_int8
    return OpKernel(op, op.prepare(weight, scale, input_scale), *weight.shape)


class W8A8Int8LinearMethod(CheckpointLinearMethod):
    def __init__(self, prefix: str, per_channel: bool, static_input: bool):
        super().__init__(prefix)
        self.per_channel, self.static_input = per_channel, static_input

    def tensor_names(self) -> tuple[str, ...]:
        return ("weight", "weight_scale") + (("input_scale",) if self.static_input else ())

    def optional_tensor_names(self) -> tuple[str, ...]:
        return ("weight_zero_point", "input_zero_point")  # written as zeros for symmetric schemes

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        per_output = TensorLayout(0) if self.per_channel else WHOLE
        return {"weight": TensorLayout(0, 1, 1, 1), "weight_scale": per_output, "weight_zero_point": per_output,
                "input_scale": WHOLE, "input_zero_point": WHOLE}

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        k = layer.input_size
        weights, scales = [], []
        for n, tensors in zip(layer.output_sizes, shards):
            weight, scale = tensors["weight"], tensors["weight_scale"].float()
            expect_dtype(self.prefix, "weight", weight, torch.int8)
            expect_shape(self.prefix, "weight", weight, (n, k), "out_features, in_features")
            for name in ("weight_zero_point", "input_zero_point"):
                if name in tensors and tensors[name].any():
                    raise ValueError(f"{self.prefix}.{name}: asymmetric INT8 is not supported (zero points must be 0)")
            if scale.numel() not in (1, n):
                raise ValueError(f"{self.prefix}.weight_scale: expected 1 or {n} values, the checkpoint has "
                                 f"{tuple(scale.shape)}")
            weights.append(weight)
            scales.append(scale.reshape(-1).expand(n))
        input_scale = None
        if self.static_input:
            input_scale = max(float(s["input_scale"].float().max()) for s in shards)
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        scale = torch.cat(scales) if len(scales) > 1 else scales[0]
        return [w8a8_kernel(weight.contiguous(), scale.contiguous(), input_scale)]
