"""Plain-torch references of the quantized linear ops that are not block-quantized: FP8 weights, INT8 weights
with INT8 activations, and additive codebooks (AQLM).

Each dequantizes (or quantizes the activations) on every call: exact, and slow. They define the numbers the
platforms' kernels are held to; a model with a faster implementation selected never runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.ops.interface import OpImpl

FP8_MAX = 448.0  # the largest float8_e4m3fn value
_CHUNK_ROWS = 4096  # rows dequantized at a time: bounds the temporary


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [n, k]
    scale: torch.Tensor  # float32 [n, k / group]
    group: int


class LinearFp8(OpImpl):
    """``w = fp8 · scale`` with one float32 scale per ``group`` inputs of each row (per-tensor and per-channel scales
    are one group of all inputs; 128×128 blocks are groups of 128 with the scale repeated over the block's rows).
    The activations stay in the model's dtype: products of FP8 weights and bf16/float32 activations are exact."""

    op, name, is_reference = "linear_fp8", "torch", True

    def accepts(self, in_features: int, group: int, act_dtype: torch.dtype) -> bool:
        """Whether :meth:`prepare` takes weights of ``in_features`` with groups of ``group`` for ``act_dtype``."""
        return in_features % group == 0

    def prepare(self, weight: torch.Tensor, scale: torch.Tensor, group: int) -> Fp8Weight:
        n, k = weight.shape
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 weights must be float8_e4m3fn, got {weight.dtype}")
        if k % group or scale.shape != (n, k // group):
            raise ValueError(f"FP8 scales for a [{n}, {k}] weight in groups of {group} must be {(n, k // group)}, "
                             f"got {tuple(scale.shape)}")
        return Fp8Weight(weight, scale.float().contiguous(), group)

    @staticmethod
    def weight(handle: Fp8Weight, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the dequantized float32 weight."""
        w = handle.weight[start:stop].float().unflatten(-1, (-1, handle.group))
        return (w * handle.scale[start:stop].unsqueeze(-1)).flatten(-2)

    def _matmul(self, handle: Fp8Weight, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n = handle.weight.shape[0]
        out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)
        for start in range(0, n, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, n)
            out[:, start:stop] = F.linear(x.to(dtype), self.weight(handle, start, stop).to(dtype))
        return out

    def apply(self, handle: Fp8Weight, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x, x.dtype)

    def logits(self, handle: Fp8Weight, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x, torch.float32)

    def greedy(self, handle: Fp8Weight, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return None

    def nbytes(self, handle: Fp8Weight) -> int:
        return handle.weight.numel() + handle.scale.numel() * 4


@dataclass
class Int8Weight:
    weight: torch.Tensor  # int8 [n, k]
    scale: torch.Tensor  # float32 [n]
    input_scale: float | None


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row: ``(codes int8, scale float32 [rows, 1])`` with
    ``x ≈ codes · scale`` (scale = amax / 127, round half to even)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    return torch.round(xf / scale).clamp(-128, 127).to(torch.int8), scale


class LinearInt8(OpImpl):
    """INT8 weights with a float32 scale per output row, times INT8 activations: per-token dynamic scales (or one
    static ``input_scale``), products summed exactly in integers and scaled once per output."""

    op, name, is_reference = "linear_int8", "torch", True

    def accepts(self, in_features: int, act_dtype: torch.dtype) -> bool:
        return True

    def prepare(self, weight: torch.Tensor, scale: torch.Tensor, input_scale: float | None = None) -> Int8Weight:
        if weight.dtype != torch.int8 or scale.shape != (weight.shape[0],):
            raise ValueError(f"INT8 weights need int8 [n, k] codes and a scale per row [n]; got {weight.dtype} "
                             f"{tuple(weight.shape)} and scale {tuple(scale.shape)}")
        return Int8Weight(weight, scale.float().contiguous(), input_scale)

    def _matmul(self, handle: Int8Weight, x: torch.Tensor) -> torch.Tensor:
        if handle.input_scale is None:
            codes, scale = quantize_int8_per_token(x)
        else:
            scale = torch.full((x.shape[0], 1), handle.input_scale, dtype=torch.float32, device=x.device)
            codes = torch.round(x.float() / handle.input_scale).clamp(-128, 127).to(torch.int8)
        # float64 sums of integer products are exact (|sum| < 2^53), as an int32-accumulating kernel's are.
        acc = F.linear(codes.double(), handle.weight.double())
        return (acc * scale.double() * handle.scale.double()).float()

    def apply(self, handle: Int8Weight, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x).to(x.dtype)

    def logits(self, handle: Int8Weight, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(handle, x)

    def greedy(self, handle: Int8Weight, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return None

    def nbytes(self, handle: Int8Weight) -> int:
        return handle.weight.numel() + handle.scale.numel() * 4


@dataclass
class CodebookWeight:
    codes: torch.Tensor  # int64 [n / out_group, k / in_group, num_codebooks], values in 0 .. codebook_size - 1
    codebooks: torch.Tensor  # float32 [shards, num_codebooks, codebook_size, out_group, in_group]
    scales: torch.Tensor  # float32 [n / out_group]
    shard_sizes: list[int]  # outputs per shard (each shard's rows take its own codebooks)


class LinearCodebook(OpImpl):
    """Additive vector quantization (AQLM): each ``out_group × in_group`` tile of ``w`` is the sum over the
    codebooks of the entry its code picks, times the tile row's scale. ``prepare`` takes one layer's codebooks
    [num_codebooks, codebook_size, out_group, in_group], or a merged layer's (q/k/v, gate/up) stacked per shard
    [shards, …] with ``shard_sizes`` (each shard's outputs; codes and scales concatenated in that order)."""

    op, name, is_reference = "linear_codebook", "torch", True

    def prepare(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                shard_sizes: list[int] | None = None) -> CodebookWeight:
        codebooks, shard_sizes = codebook_shards(codes, codebooks, shard_sizes)
        return CodebookWeight(codes.long(), codebooks.float(), scales.float().reshape(-1), shard_sizes)

    @staticmethod
    def weight(handle: CodebookWeight) -> torch.Tensor:
        _, num_codebooks, _, out_group, in_group = handle.codebooks.shape
        rows, cols, _ = handle.codes.shape
        tiles = torch.zeros(rows, cols, out_group, in_group, device=handle.codes.device)
        start = 0
        for books, size in zip(handle.codebooks, handle.shard_sizes):
            end = start + size // out_group
            for m in range(num_codebooks):
                tiles[start:end] += books[m][handle.codes[start:end, :, m]]
            start = end
        tiles = tiles * handle.scales.view(-1, 1, 1, 1)
        return tiles.permute(0, 2, 1, 3).reshape(rows * out_group, cols * in_group)

    def apply(self, handle: CodebookWeight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(handle).to(x.dtype))

    def logits(self, handle: CodebookWeight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight(handle))

    def greedy(self, handle: CodebookWeight, x: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return None

    def nbytes(self, handle: CodebookWeight) -> int:
        return sum(t.numel() * t.element_size() for t in (handle.codes, handle.codebooks, handle.scales))


def codebook_shards(codes: torch.Tensor, codebooks: torch.Tensor, shard_sizes: list[int] | None
                    ) -> tuple[torch.Tensor, list[int]]:
    """``linear_codebook.prepare``'s codebooks with a leading shard dimension, and the outputs per shard."""
    out_group = codebooks.shape[-2]
    if codebooks.dim() == 4:
        codebooks = codebooks.unsqueeze(0)
    if shard_sizes is None:
        shard_sizes = [codes.shape[0] * out_group]
    if len(shard_sizes) != codebooks.shape[0] or sum(shard_sizes) != codes.shape[0] * out_group:
        raise ValueError(f"linear_codebook: shard_sizes {shard_sizes} do not match {codebooks.shape[0]} codebook "
                         f"shards over {codes.shape[0] * out_group} outputs")
    return codebooks, list(shard_sizes)


QUANT_REFERENCE_IMPLS = [LinearFp8, LinearInt8, LinearCodebook]
