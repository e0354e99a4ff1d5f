"""The shared shape of the checkpoint-quantized linear methods (AWQ, GPTQ, FP8, compressed-tensors, AQLM).

A format names the tensors each linear layer has in its checkpoint (``qweight``, ``scales`` …). The method
registers one placeholder parameter per name whose ``weight_loader`` keeps what the checkpoint gives, per shard of
a merged layer (q/k/v, gate/up); after loading, the format's :meth:`CheckpointLinearMethod.build` turns the
shards into compact kernels (:mod:`pagoda.quantization.int_kernels` and the format's own), and the loaded tensors
are dropped. Shards of one kind concatenate into one kernel (one matmul for the merged layer); shards that can't
(different input orders, say) keep a kernel each and their outputs are concatenated.

Shapes are checked when the kernel is built, so a bad checkpoint fails at load with the layer, the tensor and
what was expected (:func:`expect_shape`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagoda.models.interface import LinearKernel
from pagoda.ops import current_ops
from pagoda.quantization.int_kernels import Kernel, PermutedKernel, affine_kernel, release_freed_memory
from pagoda.quantization.interface import EmbeddingMethod, LinearMethod
from pagoda.quantization.tensor_parallel import (PaddedPermutedKernel, TensorLayout, layer_partition,
                                                 narrow_tensor, regroup_act_order, splits_inputs)


def expect_shape(prefix: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...], why: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{prefix}.{name}: expected shape {tuple(shape)}{' (' + why + ')' if why else ''}, "
                         f"the checkpoint has {tuple(tensor.shape)}")


def expect_dtype(prefix: str, name: str, tensor: torch.Tensor, *dtypes: torch.dtype) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{prefix}.{name}: expected dtype {allowed}, the checkpoint has "
                         f"{str(tensor.dtype).removeprefix('torch.')}")


# Merged layers of pagoda's models and the checkpoint layers they hold.
MERGED_LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _names(prefix: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], prefix) is not None
    name = pattern.removesuffix(".weight")
    return prefix == name or prefix.endswith("." + name) or name.endswith("." + prefix) or \
        f".{name}." in f".{prefix}."


def matches_module(prefix: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    """Whether the layer at ``prefix`` is named by one of ``patterns``: a module name or a dotted suffix of it
    (``down_proj``, ``model.layers.0.mlp``), a checkpoint tensor name (``lm_head.weight``), or ``re:REGEX``. A
    merged layer (``qkv_proj``) matches when all of its checkpoint layers do; some but not all is an error."""
    patterns = list(patterns or ())
    if not patterns:
        return False
    if any(_names(prefix, p) for p in patterns):
        return True
    head, _, last = prefix.rpartition(".")
    parts = MERGED_LAYERS.get(last)
    if not parts:
        return False
    hits = [any(_names(f"{head}.{part}" if head else part, p) for p in patterns) for part in parts]
    if any(hits) and not all(hits):
        raise ValueError(f"{prefix}: the checkpoint leaves {[p for p, h in zip(parts, hits) if h]} unquantized "
                         f"but not {[p for p, h in zip(parts, hits) if not h]}; pagoda runs them as one layer")
    return all(hits)


@dataclass
class AffineWeight:
    """A shard decoded to ``w = (codes - zero) * scale`` per group of ``group`` inputs, its inputs in the order
    ``perm`` when not None (act-order: groups are contiguous after permuting)."""

    codes: torch.Tensor  # [N, K] uint8 0..15 (4-bit) or int8 (8-bit)
    scale: torch.Tensor  # [N, K / group] float32
    zero: torch.Tensor | None  # [N, K / group] float32 (integers); None: 0
    group: int
    bits: int
    perm: torch.Tensor | None = None
    # The layer's input count when ``perm`` also reads a zero input past it (act-order groups padded to whole
    # sub-groups on a rank holding part of the inputs, see tensor_parallel.regroup_act_order).
    padded_inputs: int | None = None


def affine_kernels(shards: list[AffineWeight], act_dtype: torch.dtype) -> list[Kernel]:
    """Kernels for the decoded shards of one layer: one kernel over all shards when they share the group, bits and
    input order, else one per shard."""
    op = current_ops().linear_block_quant
    first = shards[0]
    same = all(s.group == first.group and s.bits == first.bits and (s.zero is None) == (first.zero is None)
               and _same_perm(s.perm, first.perm) and s.padded_inputs == first.padded_inputs for s in shards)
    groups = [shards] if same else [[s] for s in shards]
    kernels: list[Kernel] = []
    for part in groups:
        codes = torch.cat([s.codes for s in part]) if len(part) > 1 else part[0].codes
        scale = torch.cat([s.scale for s in part]) if len(part) > 1 else part[0].scale
        zero = None
        if part[0].zero is not None:
            zero = torch.cat([s.zero for s in part]) if len(part) > 1 else part[0].zero
        kernel = affine_kernel(codes, scale, zero, part[0].group, part[0].bits, act_dtype, op)
        if part[0].padded_inputs is not None:
            kernel = PaddedPermutedKernel(kernel, part[0].perm, part[0].padded_inputs)
        elif part[0].perm is not None:
            kernel = PermutedKernel(kernel, part[0].perm)
        kernels.append(kernel)
    return kernels


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def group_order(g_idx: torch.Tensor, group: int, prefix: str) -> torch.Tensor | None:
    """The input order that makes each group's inputs contiguous (act-order checkpoints), or None when they
    already are. ``g_idx[k]`` is the group of input ``k``."""
    k = g_idx.numel()
    natural = torch.arange(k, device=g_idx.device) // group
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, natural):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], natural):
        raise ValueError(f"{prefix}.g_idx: every group must hold exactly {group} inputs; this g_idx doesn't "
                         "(static-group checkpoints with uneven groups are not supported)")
    return perm


def order_inputs(layer: nn.Module, codes: torch.Tensor, g_idx: torch.Tensor | None, scale: torch.Tensor,
                 zero: torch.Tensor | None, group: int, group_size: int, full_groups: bool, prefix: str,
                 g_idx_name: str = "g_idx"):
    """A shard's codes [N, K] and per-group ``scale`` / ``zero`` put in an input order with contiguous groups,
    from ``g_idx`` (the group of each of the layer's K inputs; None: already contiguous). ``group_size``: the
    checkpoint's (−1: one group over all inputs). ``full_groups``: the scales are every group's (an act-order layer
    on a rank holding part of the inputs) rather than the rank's own. Returns (codes, scale, zero, group, perm,
    padded_inputs) for :class:`AffineWeight`."""
    if g_idx is None:
        if full_groups:
            raise ValueError(f"{prefix}: an act-order layer split over its inputs needs its {g_idx_name}")
        return codes, scale, zero, group, None, None
    expect_shape(prefix, g_idx_name, g_idx, (codes.shape[1],), "in_features")
    if full_groups:
        codes, scale, zero, perm, sub = regroup_act_order(codes, g_idx, scale, zero, group)
        return codes, scale, zero, sub, perm, g_idx.numel()
    # A rank holding part of the inputs has the scales of its own groups only: number them from its first.
    first = layer.partition.input_slice[0] // group_size if splits_inputs(layer) and group_size > 0 else 0
    perm = group_order(g_idx.to(torch.int64) - first, group, prefix)
    if perm is not None:
        codes = codes.index_select(1, perm)
    return codes, scale, zero, group, perm, None


def keeps_full_groups(layer: nn.Module, act_order: bool, group_size: int) -> bool:
    """Whether this rank loads every group's scales: an act-order layer whose inputs are split over the ranks
    (its inputs belong to any group), as vLLM does."""
    return act_order and group_size > 0 and splits_inputs(layer)


class CheckpointLinearMethod(LinearMethod):
    """Base for formats whose linear layers load a fixed set of tensors; subclasses give :meth:`tensor_names` and
    :meth:`build`."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def tensor_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def optional_tensor_names(self) -> tuple[str, ...]:
        """Tensors a checkpoint may leave out (``g_idx`` of old GPTQ files, say); :meth:`build` sees them only
        when loaded."""
        return ()

    def build(self, layer: nn.Module, shards: list[dict[str, torch.Tensor]]) -> list[Kernel]:
        """Kernels computing the layer from the loaded tensors of each shard (in output order)."""
        raise NotImplementedError

    def tensor_layouts(self, layer: nn.Module) -> dict[str, TensorLayout]:
        """How each checkpoint tensor runs over the layer's output and input features, so a tensor-parallel rank
        loads only its part (:mod:`pagoda.quantization.tensor_parallel`); a tensor missing here can't be split."""
        return {}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        layer.input_size = input_size
        layer.output_sizes = list(output_sizes)
        layer.params_dtype = params_dtype
        layer.loaded_shards = [{} for _ in output_sizes]
        layer.loaded_whole = None  # set by the first tensor loaded: fused (True) or shard by shard (False)
        layer.quant_kernels = None
        optional = self.optional_tensor_names()
        for name in self.tensor_names() + optional:
            param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            param.weight_loader = self._loader(layer, name)
            param.optional_weight = name in optional  # the loader's completeness check skips it
            layer.register_parameter(name, param)
        register_bias(layer, output_sizes, bias, params_dtype)

    def _loader(self, layer: nn.Module, name: str):
        prefix = self.prefix
        partition = layer_partition(layer, prefix)  # None: this rank holds the whole layer

        def load(param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
            if partition is not None:
                loaded = narrow_tensor(partition, self.tensor_layouts(layer).get(name), loaded, shard_id, prefix,
                                       name)
            # A merged layer takes its tensors shard by shard (Llama's q/k/v) or whole, when the checkpoint
            # stores it fused (Phi-3's qkv_proj): the whole is one shard spanning every output.
            whole = shard_id is None and len(layer.output_sizes) > 1
            if layer.loaded_whole is None:
                layer.loaded_whole = whole
            elif layer.loaded_whole != whole:
                raise ValueError(f"{prefix}.{name}: the checkpoint stores this merged layer both fused and split")
            layer.loaded_shards[shard_id or 0][name] = loaded

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.quant_kernels is not None:
            return
        device = next(iter(layer.parameters())).device
        loaded_shards, sizes = layer.loaded_shards, layer.output_sizes
        if layer.loaded_whole:
            loaded_shards = loaded_shards[:1]
        shards = []
        for index, loaded in enumerate(loaded_shards):
            missing = [n for n in self.tensor_names() if n not in loaded]
            if missing:
                shard = f" (shard {index})" if len(loaded_shards) > 1 else ""
                raise ValueError(f"{self.prefix}{shard}: the checkpoint lacks {', '.join(missing)}")
            shards.append({n: t.to(device) for n, t in loaded.items()})
        layer.loaded_shards = None  # drop the checkpoint's tensors once built
        if layer.loaded_whole:
            # The formats build one kernel per (output size, shard); a fused tensor is one shard of every output.
            layer.output_sizes = [sum(sizes)]
        try:
            layer.quant_kernels = self.build(layer, shards)
        finally:
            layer.output_sizes = sizes
        release_freed_memory()

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return apply_kernels(layer.quant_kernels, layer.bias, x)

    def kernel(self, layer: nn.Module) -> LinearKernel | None:
        # One op call computes the layer when it has one kernel that is an op's handle (block-quantized, FP8,
        # INT8, codebook — not a torch-form kernel), its inputs reordered first for act-order GPTQ; the platform
        # decides what it can fuse.
        kernels = layer.quant_kernels
        if kernels is None or len(kernels) != 1:
            return None
        kernel, order = kernels[0], None
        if isinstance(kernel, PermutedKernel):
            kernel, order = kernel.inner, kernel.perm
        if getattr(kernel, "handle", None) is None:
            return None
        return LinearKernel(kernel.op, kernel.handle, layer.bias, order)


def apply_kernels(kernels: list[Kernel], bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A layer's output from its kernels (one per group of shards, outputs concatenated) and bias, added in the
    output's dtype."""
    out = kernels[0].matmul(x) if len(kernels) == 1 else torch.cat([k.matmul(x) for k in kernels], dim=-1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def register_bias(layer: nn.Module, output_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
    """The layer's ``bias`` parameter, loaded whole or shard by shard; None without one."""
    if bias:
        b = nn.Parameter(torch.zeros(sum(output_sizes), dtype=dtype), requires_grad=False)
        b.weight_loader = bias_loader(output_sizes, layer_partition(layer, getattr(layer, "prefix", "")))
        layer.register_parameter("bias", b)
    else:
        layer.bias = None


def bias_loader(output_sizes: list[int], partition: Any = None):
    """The ``weight_loader`` of a (merged) layer's bias: the whole, or one shard at its offset (``output_sizes``
    this rank's; ``partition`` narrows the checkpoint's bias to them)."""
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if partition is not None:
            loaded = partition.narrow_bias(loaded, shard_id)
        target = param.data if shard_id is None else param.data.narrow(0, offsets[shard_id], output_sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"bias shape mismatch for shard {shard_id}: parameter {tuple(target.shape)} vs "
                             f"checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)

    return load


class LinearHeadMethod(EmbeddingMethod):
    """An LM head stored as a quantized linear layer (GPTQ's ``lm_head: true``): logits through the linear
    method's kernels. It serves no embedding lookups (a tied table is never quantized this way)."""

    def __init__(self, linear: CheckpointLinearMethod):
        self.linear = linear

    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        self.linear.create_weights(layer, embedding_dim, [num_embeddings], False, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.linear.process_weights_after_loading(layer)

    def embed(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.linear.prefix}: a quantized LM head can't serve as the embedding table")

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        kernels = layer.quant_kernels
        return kernels[0].matmul_float(hidden)

    def greedy(self, layer: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        return layer.quant_kernels[0].argmax(hidden, allowed)
