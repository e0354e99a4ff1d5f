"""compressed-tensors checkpoints (llm-compressor's output), as vLLM's ``compressed-tensors`` method.

The ``quantization_config`` maps layers to schemes through ``config_groups`` (each with ``targets``: ``Linear``,
layer names or ``re:`` patterns) minus the ``ignore`` list. Supported schemes, by what the weights are (the
``format`` names are not reliable: FP8 weight-only files say ``naive-quantized``):

- float 8-bit weights → FP8 (per tensor, per channel or per block; static or dynamic activations), see
  :mod:`pagoda.quantization.fp8`;
- int 8-bit weights with int 8-bit activations → W8A8 INT8, see :mod:`pagoda.quantization.int8`;
- int 4- or 8-bit weights alone, ``pack-quantized`` (W4A16 / W8A16): ``weight_packed`` int32 [N, K·b/32] packed
  along the inputs, stored as ``q + 2^(b-1)``; ``weight_scale`` [N, K/g]; asymmetric schemes add
  ``weight_zero_point`` int32 [N·b/32, K/g] packed along the outputs, stored the same way. ``w = (q − z)·s``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.quantization.checkpoint_linear import (AffineWeight, CheckpointLinearMethod, affine_kernels,
                                                   expect_dtype, expect_shape, keeps_full_groups, matches_module,
                                                   order_inputs)
from pagoda.quantization.fp8 import Fp8LinearMethod
from pagoda.quantization.int8 import W8A8Int8LinearMethod
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.packing import unpack_int32
from pagoda.quantization.tensor_parallel import WHOLE, TensorLayout
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


class PackedIntLinearMethod(CheckpointLinearMethod):
    """W4A16 / W8A16 (``pack-quantized``, or int8 codes stored unpacked)."""

    def __init__(self, prefix: str, bits: int, group_size: int | None, symmetric: bool, packed: bool,
                 act_order: bool = False):
        super().__init__(prefix)
        self.bits, self.group_size, self.symmetric, self.packed = bits, group_size, symmetric, packed
        self.act_order = act_order  # ``actorder: group``: the groups of ``weight_g_idx`` are not contiguous

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        # Codes pack 32 / bits inputs per int32 along the inputs, zero points 32 / bits outputs; per-group tensors
        # split with the inputs, except where every rank needs every group's (channel scales; act-order row
        # splits). ``weight_shape`` is the full layer's.
        per_word = 32 // self.bits
        group_size = self.group_size or 0
        split_groups = group_size > 0 and not keeps_full_groups(layer, self.act_order, group_size)
        group = (1, group_size) if split_groups else (None, 1)
        return {"weight_packed": TensorLayout(0, 1, 1, per_word), "weight": TensorLayout(0, 1, 1, 1),
                "weight_scale": TensorLayout(0, 1, *group), "weight_zero_point": TensorLayout(0, per_word, *group),
                "weight_shape": WHOLE, "weight_g_idx": TensorLayout(None, 1, 0, 1)}

    def tensor_names(self) -> tuple[str, ...]:
        names = ("weight_packed" if self.packed else "weight", "weight_scale")
        return names if self.symmetric else names + ("weight_zero_point",)

    def optional_tensor_names(self) -> tuple[str, ...]:
        extra = ("weight_shape", "weight_g_idx")
        return extra + (("weight_zero_point",) if self.symmetric else ())

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        k, bits = layer.input_size, self.bits
        group = self.group_size or k
        full_groups = keeps_full_groups(layer, self.act_order, self.group_size or 0)
        if k % group and not full_groups:
            raise ValueError(f"{self.prefix}: group_size {group} does not divide the input size {k}")
        groups, half = (layer.partition.input_size if full_groups else k) // group, 1 << (bits - 1)
        decoded = []
        for index, (n, tensors) in enumerate(zip(layer.output_sizes, shards)):
            if self.packed:
                packed = tensors["weight_packed"]
                expect_dtype(self.prefix, "weight_packed", packed, torch.int32)
                expect_shape(self.prefix, "weight_packed", packed, (n, k * bits // 32), f"out, in * {bits} / 32")
                stored = unpack_int32(packed, bits, 1)  # [N, K], q + 2^(b-1)
            else:
                weight = tensors["weight"]
                expect_dtype(self.prefix, "weight", weight, torch.int8)
                expect_shape(self.prefix, "weight", weight, (n, k))
                stored = weight.to(torch.int32) + half
            full_shape = _full_shape(layer, index, n, k)
            if "weight_shape" in tensors and tensors["weight_shape"].tolist() != full_shape:
                raise ValueError(f"{self.prefix}.weight_shape: {tensors['weight_shape'].tolist()} is not the layer's "
                                 f"{full_shape}")
            scale = tensors["weight_scale"].float()
            expect_shape(self.prefix, "weight_scale", scale, (n, groups), f"out, in / group_size {group}")
            if self.symmetric:
                zeros = torch.full_like(scale, float(half))
            else:
                zp = tensors["weight_zero_point"]
                per_word = 32 // bits
                expect_shape(self.prefix, "weight_zero_point", zp, (-(-n // per_word), groups),
                             f"out * {bits} / 32, groups")
                zeros = unpack_int32(zp, bits, 0)[:n].float()
            stored, scale, zeros, sub, perm, padded = order_inputs(layer, stored, tensors.get("weight_g_idx"), scale,
                                                                   zeros, group, self.group_size or 0, full_groups,
                                                                   self.prefix, "weight_g_idx")
            if bits == 4:
                decoded.append(AffineWeight(stored.to(torch.uint8), scale, zeros, sub, 4, perm, padded))
            else:
                zero = zeros - half
                decoded.append(AffineWeight((stored - half).to(torch.int8), scale, zero if zero.any() else None,
                                            sub, 8, perm, padded))
        return affine_kernels(decoded, layer.params_dtype)


def _full_shape(layer: nn.Module, index: int, n: int, k: int) -> list[int]:
    """The whole layer's [out, in] of output shard ``index`` (``n`` × ``k`` on this rank), as ``weight_shape``
    records it."""
    partition = getattr(layer, "partition", None)
    if partition is None or partition.is_whole:
        return [n, k]
    out = sum(partition.output_sizes) if len(layer.output_sizes) != len(partition.output_sizes) \
        else partition.output_sizes[index]
    return [out, partition.input_size]


class _Scheme:
    def __init__(self, targets: list[str], weights: dict[str, Any], inputs: dict[str, Any] | None, fmt: str | None):
        self.targets, self.weights, self.inputs, self.format = targets, weights, inputs, fmt

    def linear_method(self, prefix: str) -> LinearMethod:
        w, a = self.weights, self.inputs
        kind, bits, strategy = w.get("type", "int"), int(w.get("num_bits", 8)), w.get("strategy", "tensor")
        where = f"quantization_config.config_groups ({prefix})"
        if kind == "float" and bits == 8:
            if a is not None and (a.get("type") != "float" or int(a.get("num_bits", 8)) != 8):
                raise ValueError(f"{where}: FP8 weights with {a.get('type')}{a.get('num_bits')} activations are "
                                 "not supported")
            static = a is not None and not a.get("dynamic", True)
            if static and a.get("strategy", "tensor") != "tensor":
                raise ValueError(f"{where}: static FP8 activation scales must be per tensor")
            if strategy == "block":
                block = w.get("block_structure") or [128, 128]
                return Fp8LinearMethod(prefix, "block", (int(block[0]), int(block[1])), "weight_scale", static)
            if strategy not in ("tensor", "channel"):
                raise ValueError(f"{where}: FP8 weight strategy {strategy!r} is not supported; supported: tensor, "
                                 "channel, block")
            return Fp8LinearMethod(prefix, strategy, None, "weight_scale", static)
        if kind == "int" and a is not None:
            if bits != 8 or a.get("type", "int") != "int" or int(a.get("num_bits", 8)) != 8:
                raise ValueError(f"{where}: int{bits} weights with {a.get('type')}{a.get('num_bits')} activations "
                                 "are not supported; supported: W8A8 (int8 weights and activations)")
            if strategy not in ("tensor", "channel"):
                raise ValueError(f"{where}: W8A8 weight strategy {strategy!r} is not supported; supported: tensor, "
                                 "channel")
            if not a.get("symmetric", True) or not w.get("symmetric", True):
                raise ValueError(f"{where}: asymmetric W8A8 is not supported")
            dynamic = a.get("dynamic", True)
            if not dynamic and a.get("strategy", "tensor") != "tensor":
                raise ValueError(f"{where}: static INT8 activation scales must be per tensor")
            return W8A8Int8LinearMethod(prefix, strategy == "channel", not dynamic)
        if kind == "int" and a is None:
            if bits not in (4, 8):
                raise ValueError(f"{where}: int{bits} weights are not supported; supported: 4, 8 bits")
            if strategy not in ("group", "channel"):
                raise ValueError(f"{where}: weight-only int strategy {strategy!r} is not supported; supported: group, "
                                 "channel")
            group = int(w.get("group_size") or 0) if strategy == "group" else None
            return PackedIntLinearMethod(prefix, bits, group, bool(w.get("symmetric", True)),
                                         self.format != "naive-quantized" or bits == 4,
                                         w.get("actorder") in ("group", True))
        raise ValueError(f"{where}: {kind}{bits} weights ({self.format}) are not supported; supported: FP8, W8A8 "
                         "INT8, W4A16/W8A16")


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, schemes: list[_Scheme], ignore: list[str]):
        self.schemes, self.ignore = schemes, ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        if (config.get("sparsity_config") or {}).get("format") not in (None, "dense"):
            raise ValueError("quantization_config.sparsity_config: sparse compressed-tensors checkpoints are not "
                             "supported")
        status = config.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ValueError(f"quantization_config.quantization_status: {status!r} checkpoints are not supported; "
                             "supported: compressed, frozen")
        top_format = config.get("format")
        schemes = []
        for name, group in (config.get("config_groups") or {}).items():
            if group.get("output_activations"):
                raise ValueError(f"quantization_config.config_groups.{name}.output_activations are not supported")
            if not group.get("weights"):
                raise ValueError(f"quantization_config.config_groups.{name}: a group without weights is not "
                                 "supported")
            schemes.append(_Scheme(list(group.get("targets") or []), group["weights"], group.get("input_activations"),
                                   group.get("format") or top_format))
        if not schemes:
            raise ValueError("quantization_config.config_groups is empty")
        return cls(schemes, list(config.get("ignore") or []))

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if matches_module(prefix, self.ignore):
            return UnquantizedLinearMethod()
        for scheme in self.schemes:
            if "Linear" in scheme.targets or matches_module(prefix, scheme.targets):
                return scheme.linear_method(prefix)
        return UnquantizedLinearMethod()  # layers no group targets stay dense

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


@hookimpl
def pagoda_register_quantization_methods():
    return [CompressedTensorsConfig]
