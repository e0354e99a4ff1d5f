"""GPTQ checkpoints (AutoGPTQ, GPTQModel), as vLLM's ``gptq`` method.

Per linear layer: ``qweight`` int32 [K·b/32, N] (codes packed along the inputs), ``qzeros`` int32 [G, N·b/32]
(packed along the outputs), ``scales`` [G, N], ``g_idx`` int32 [K] (the group of each input; not monotone with
act-order, ``desc_act``). ``w[n, k] = (q[k, n] − z[g_idx[k], n]) · s[g_idx[k], n]``, where the stored zero is
``z − 1`` in the original format (``checkpoint_format`` "gptq") and ``z`` itself in "gptq_v2". 4- and 8-bit;
``group_size`` −1 is one group over all inputs; ``lm_head: true`` quantizes the LM head too. ``dynamic`` (GPTQModel)
overrides these per module: its keys are regular expressions matched against the module's name, ``-:`` before
one leaves matching modules dense, and ``+:`` (or nothing) gives them the values of its dict.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pagoda.quantization.checkpoint_linear import (AffineWeight, CheckpointLinearMethod, LinearHeadMethod,
                                                   affine_kernels, expect_dtype, expect_shape, keeps_full_groups,
                                                   order_inputs)
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.packing import unpack_int32
from pagoda.quantization.tensor_parallel import TensorLayout
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

SUPPORTED_BITS = (4, 8)


class GPTQLinearMethod(CheckpointLinearMethod):
    def __init__(self, prefix: str, bits: int, group_size: int, v2_zeros: bool, desc_act: bool = False):
        super().__init__(prefix)
        self.bits, self.group_size, self.v2_zeros, self.desc_act = bits, group_size, v2_zeros, desc_act

    def tensor_names(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def optional_tensor_names(self) -> tuple[str, ...]:
        return ("g_idx",)  # written by every recent tool; older files without act-order may lack it

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        # Codes pack 32 / bits inputs per int32, zeros 32 / bits outputs. Per-group tensors split with the inputs,
        # except where every rank needs every group's (one group over all inputs; act-order row splits).
        per_word = 32 // self.bits
        split_groups = self.group_size > 0 and not keeps_full_groups(layer, self.desc_act, self.group_size)
        group = (0, self.group_size) if split_groups else (None, 1)
        return {"qweight": TensorLayout(1, 1, 0, per_word), "qzeros": TensorLayout(1, per_word, *group),
                "scales": TensorLayout(1, 1, *group), "g_idx": TensorLayout(None, 1, 0, 1)}

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        k, bits = layer.input_size, self.bits
        per_word = 32 // bits
        group = self.group_size if self.group_size > 0 else k
        full_groups = keeps_full_groups(layer, self.desc_act, self.group_size)
        if k % group and not full_groups:
            raise ValueError(f"{self.prefix}: group_size {group} does not divide the input size {k}")
        if k % per_word:
            raise ValueError(f"{self.prefix}: {bits}-bit GPTQ packs {per_word} inputs per int32; {k} is not a multiple")
        groups = layer.partition.input_size // group if full_groups else k // group
        decoded = []
        for n, tensors in zip(layer.output_sizes, shards):
            qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
            expect_dtype(self.prefix, "qweight", qweight, torch.int32)
            expect_shape(self.prefix, "qweight", qweight, (k // per_word, n), f"in_features * {bits} / 32, out")
            expect_shape(self.prefix, "scales", scales, (groups, n), f"in_features / group_size {group}, out")
            expect_shape(self.prefix, "qzeros", qzeros, (groups, -(-n // per_word)), f"groups, out * {bits} / 32")
            codes = unpack_int32(qweight, bits, 0).t()  # [N, K]
            zeros = unpack_int32(qzeros, bits, 1)[:, :n].t().float()  # [N, G]
            if not self.v2_zeros:
                zeros = zeros + 1  # the original format stores zero - 1 (and kernels add the 1 back unmasked)
            scale = scales.float().t().contiguous()
            codes, scale, zeros, sub, perm, padded = order_inputs(layer, codes, tensors.get("g_idx"), scale, zeros,
                                                                  group, self.group_size, full_groups, self.prefix)
            decoded.append(_affine(codes, scale, zeros, sub, bits, perm, padded))
        return affine_kernels(decoded, layer.params_dtype)


def _affine(codes: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor, group: int, bits: int,
            perm: torch.Tensor | None, padded_inputs: int | None = None) -> AffineWeight:
    """``(q - z) * s``: 4-bit codes as they are; 8-bit codes centred on 128 (int8), with a zero only where the
    zero point is not 128."""
    if bits == 4:
        return AffineWeight(codes.contiguous().to(torch.uint8), scale, zeros, group, 4, perm, padded_inputs)
    centred = (codes - 128).to(torch.int8).contiguous()
    zero = zeros - 128
    return AffineWeight(centred, scale, zero if zero.any() else None, group, 8, perm, padded_inputs)


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, v2_zeros: bool, lm_head: bool,
                 dynamic: dict[str, dict[str, Any]] | None = None):
        self.bits, self.group_size, self.desc_act, self.v2_zeros = bits, group_size, desc_act, v2_zeros
        self.lm_head = lm_head
        self.dynamic = dynamic or {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        bits = _bits(config.get("bits", 4), "quantization_config.bits")
        group = _group(config.get("group_size", 128), "quantization_config.group_size")
        fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format: {fmt!r} is not supported; supported: gptq, "
                             "gptq_v2")
        dynamic = dict(config.get("dynamic") or {})
        for pattern, values in dynamic.items():
            where = f"quantization_config.dynamic[{pattern!r}]"
            try:
                re.compile(pattern.removeprefix("+:").removeprefix("-:"))
            except re.error as e:
                raise ValueError(f"{where}: not a regular expression ({e})") from None
            if not pattern.startswith("-:"):
                _bits(values.get("bits", bits), where + ".bits")
                _group(values.get("group_size", group), where + ".group_size")
        return cls(bits, group, bool(config.get("desc_act", False)), fmt == "gptq_v2",
                   bool(config.get("lm_head", False)), dynamic)

    def _method(self, prefix: str) -> GPTQLinearMethod | None:
        """This module's method after the ``dynamic`` overrides; None when they leave it dense."""
        bits, group, desc_act = self.bits, self.group_size, self.desc_act
        for pattern, values in self.dynamic.items():
            if re.match(pattern.removeprefix("+:").removeprefix("-:"), prefix):
                if pattern.startswith("-:"):
                    return None
                bits, group = int(values.get("bits", bits)), int(values.get("group_size", group))
                desc_act = bool(values.get("desc_act", desc_act))
                break
        return GPTQLinearMethod(prefix, bits, group, self.v2_zeros, desc_act)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return self._method(prefix) or UnquantizedLinearMethod()

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        if self.lm_head and prefix.split(".")[-1] == "lm_head":
            method = self._method(prefix)
            if method is not None:
                return LinearHeadMethod(method)
        return UnquantizedEmbeddingMethod()


def _bits(value: Any, where: str) -> int:
    bits = int(value)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: GPTQ with {bits}-bit weights is not supported; supported: "
                         f"{', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def _group(value: Any, where: str) -> int:
    group = int(value)
    if group <= 0 and group != -1:
        raise ValueError(f"{where} must be positive or -1, got {group}")
    return group


@hookimpl
def pagoda_register_quantization_methods():
    return [GPTQConfig]
