"""AQLM checkpoints (additive quantization of language models), as the last vLLM releases that had ``aqlm``.

Per linear layer: ``codes`` [N/og, K/ig, M] (int8 for codebooks of up to 256 entries, int16 up to 65536, stored
signed: take them modulo 2^nbits), ``codebooks`` [M, 2^nbits, og, ig], ``scales`` [N/og, 1, 1, 1]. Each
``og × ig`` tile of the weight is the sum over the M codebooks of the entry its code picks, times the tile row's
scale. The ``linear_codebook`` op multiplies by the codes; a merged layer (q/k/v, gate/up) is one op handle whose
shards keep their own codebooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.ops import current_ops
from pagoda.quantization.checkpoint_linear import CheckpointLinearMethod, expect_shape, matches_module
from pagoda.quantization.int_kernels import OpKernel
from pagoda.quantization.tensor_parallel import WHOLE, TensorLayout
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod, QuantizationConfig
from pagoda.quantization.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


class AQLMLinearMethod(CheckpointLinearMethod):
    def __init__(self, prefix: str, in_group: int, out_group: int, num_codebooks: int, nbits: int):
        super().__init__(prefix)
        self.in_group, self.out_group, self.num_codebooks, self.nbits = in_group, out_group, num_codebooks, nbits

    def tensor_names(self) -> tuple[str, ...]:
        return ("codes", "codebooks", "scales")

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        # Codes split on output groups (column) or input groups (row); every rank needs the whole codebooks.
        og, ig = self.out_group, self.in_group
        return {"codes": TensorLayout(0, og, 1, ig), "codebooks": WHOLE, "scales": TensorLayout(0, og)}

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]):
        # One kernel for the whole (merged) layer: its shards' codes and scales side by side, their codebooks
        # stacked, so a q/k/v or gate/up projection is one op call (and one weight for a fused decode step).
        k, ig, og, m = layer.input_size, self.in_group, self.out_group, self.num_codebooks
        if k % ig:
            raise ValueError(f"{self.prefix}: in_group_size {ig} does not divide the input size {k}")
        for index, (n, tensors) in enumerate(zip(layer.output_sizes, shards)):
            shard = f" (shard {index})" if len(shards) > 1 else ""
            if n % og:
                raise ValueError(f"{self.prefix}{shard}: out_group_size {og} does not divide the output size {n}")
            codes, codebooks, scales = tensors["codes"], tensors["codebooks"], tensors["scales"]
            expect_shape(self.prefix + shard, "codes", codes, (n // og, k // ig, m), "out / og, in / ig, codebooks")
            expect_shape(self.prefix + shard, "codebooks", codebooks, (m, 1 << self.nbits, og, ig),
                         "codebooks, 2^nbits, og, ig")
            expect_shape(self.prefix + shard, "scales", scales, (n // og, 1, 1, 1))
        codes = torch.cat([t["codes"].to(torch.int64) % (1 << self.nbits) for t in shards])  # stored signed
        codebooks = torch.stack([t["codebooks"] for t in shards])
        scales = torch.cat([t["scales"] for t in shards])
        op = current_ops().linear_codebook
        sizes = list(layer.output_sizes)
        return [OpKernel(op, op.prepare(codes, codebooks, scales, sizes), sum(sizes), k)]


class AQLMConfig(QuantizationConfig):
    name = "aqlm"

    def __init__(self, in_group: int, out_group: int, num_codebooks: int, nbits: int, skip: list[str]):
        self.in_group, self.out_group, self.num_codebooks, self.nbits = in_group, out_group, num_codebooks, nbits
        self.skip = skip

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AQLMConfig:
        try:
            in_group, out_group = int(config["in_group_size"]), int(config["out_group_size"])
            num_codebooks, nbits = int(config["num_codebooks"]), int(config["nbits_per_codebook"])
        except KeyError as e:
            raise ValueError(f"quantization_config.{e.args[0]} is required for AQLM") from None
        if not 1 <= nbits <= 16:
            raise ValueError(f"quantization_config.nbits_per_codebook: {nbits} is not supported; supported: 1 to 16")
        return cls(in_group, out_group, num_codebooks, nbits, list(config.get("linear_weights_not_to_quantize") or []))

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if matches_module(prefix, self.skip):
            return UnquantizedLinearMethod()
        return AQLMLinearMethod(prefix, self.in_group, self.out_group, self.num_codebooks, self.nbits)

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


@hookimpl
def pagoda_register_quantization_methods():
    return [AQLMConfig]
