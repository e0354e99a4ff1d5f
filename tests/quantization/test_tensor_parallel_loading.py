"""Quantized layers loaded as tensor-parallel ranks, against the same layer loaded whole.

Every format's layers are built three ways from the same real checkpoint tensors (the tool-made tiny Llama
checkpoints under ``tests/fixtures/quant``, GGUF blocks from ``gguf``'s quantizer): whole, and as rank 0 and rank 1
of 2 (a :class:`LinearPartition` / :class:`VocabPartition` set on the layer before its method creates its weights,
as ``Linear`` / ``VocabEmbedding`` do). Column ranks' outputs, put side by side per output shard, must equal the
whole layer's; row ranks' outputs must sum to it (float32 rounding of the partial sums). A split that cuts a packed
word, a quantization group or a block is an error naming the layer and the tensor. No torch.distributed: each rank
is a layer of its own in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pagoda.distributed.partition import LinearPartition, VocabPartition
from pagoda.ops import reference_ops, use_ops
from pagoda.plugins.registry import get_registry

from .conftest import random_blocks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "quant"
TP = 2
HEAD = 32  # the fixtures' head size: q/k/v split on whole heads
ATTN = "model.layers.0.self_attn"
MLP = "model.layers.0.mlp"
# (layer, checkpoint layers it merges, input size, how it splits); output sizes come from the checkpoint
LAYERS = {
    "qkv": (f"{ATTN}.qkv_proj", [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"], 128, "column"),
    "gate_up": (f"{MLP}.gate_up_proj", [f"{MLP}.gate_proj", f"{MLP}.up_proj"], 128, "column"),
    "o": (f"{ATTN}.o_proj", [f"{ATTN}.o_proj"], 128, "row"),
    "down": (f"{MLP}.down_proj", [f"{MLP}.down_proj"], 256, "row"),
}
CASES = [
    ("awq_g32", ["qkv", "gate_up", "o", "down"]),
    ("gptq_sym_g32", ["qkv", "o", "down"]),
    ("gptq_asym_act_g32", ["qkv", "o", "down"]),  # desc_act: row ranks keep every group's scales
    ("gptq_8bit_g64", ["gate_up", "down"]),
    ("gptq_v2_asym_g64", ["qkv", "down"]),
    ("gptq_gm1", ["qkv", "o"]),  # one group over all inputs: every row rank keeps the scales
    ("fp8_tensor_static", ["qkv", "o"]),
    ("fp8_block", ["gate_up", "down"]),  # 128x128 block scales
    ("ct_fp8_dynamic", ["qkv", "down"]),
    ("ct_fp8_block", ["gate_up", "down"]),
    ("ct_w8a8_int8", ["qkv", "o"]),
    ("ct_w4a16", ["gate_up", "o"]),
    ("ct_w4a16_asym", ["qkv", "down"]),
    ("ct_w8a16", ["qkv", "down"]),
    ("aqlm_2x8", ["qkv", "o"]),
]

_checkpoints: dict[str, dict[str, torch.Tensor]] = {}


def checkpoint(name: str) -> tuple[dict[str, torch.Tensor], object]:
    if name not in _checkpoints:
        _checkpoints[name] = load_file(str(FIXTURES / name / "model.safetensors"))
    config = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    method = get_registry().get_quantization_method(config["quant_method"]).from_config(config)
    return _checkpoints[name], method


def layer_tensors(ckpt: dict, source: str) -> dict[str, torch.Tensor]:
    return {key[len(source) + 1:]: value for key, value in ckpt.items() if key.startswith(source + ".")}


def output_size(tensors: dict[str, torch.Tensor], layouts: dict) -> int:
    """A checkpoint layer's output features, from a tensor that runs over them one per element."""
    for name, tensor in tensors.items():
        layout = layouts.get(name)
        if layout is not None and layout.out_dim is not None and layout.out_unit == 1 and tensor.dim() > 1:
            return tensor.shape[layout.out_dim]
    raise AssertionError(f"no output-feature tensor among {sorted(tensors)}")


def shard_sizes(quant_config, prefix: str, input_size: int, shards: list[dict[str, torch.Tensor]]) -> list[int]:
    """The output size of each checkpoint layer, read through the format's tensor layouts."""
    probe = build(quant_config, prefix, LinearPartition.replicated(input_size, [1], prefix))
    layouts = probe.quant_method.tensor_layouts(probe)
    return [output_size(s, layouts) for s in shards]


def build(quant_config, prefix: str, partition: LinearPartition, bias: bool = False,
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """A linear layer as ``Linear`` builds it: its partition set, then its method creates the rank's weights."""
    layer = nn.Module()
    layer.prefix, layer.partition = prefix, partition
    layer.quant_method = quant_config.get_linear_method(prefix)
    layer.quant_method.create_weights(layer, partition.local_input_size, partition.local_output_sizes, bias, dtype)
    return layer


def load(layer: nn.Module, shards: list[dict[str, torch.Tensor]], fused: bool = False,
         bias: list[torch.Tensor] | None = None) -> nn.Module:
    for index, tensors in enumerate(shards):
        shard = None if fused or len(shards) == 1 else index
        for name, value in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, value, shard) if shard is not None else param.weight_loader(param, value)
        if bias is not None:
            layer.bias.weight_loader(layer.bias, bias[index], shard) if shard is not None else \
                layer.bias.weight_loader(layer.bias, bias[index])
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def partitions(kind: str, input_size: int, sizes: list[int], prefix: str, tp: int = TP,
               units: list[int] | None = None) -> list[LinearPartition]:
    if kind == "column":
        return [LinearPartition.column(input_size, sizes, r, tp, units, prefix) for r in range(tp)]
    return [LinearPartition.row(input_size, sizes, r, tp, prefix) for r in range(tp)]


def check_ranks(quant_config, prefix: str, kind: str, input_size: int, sizes: list[int],
                shards: list[dict[str, torch.Tensor]], units: list[int] | None = None, fused: bool = False,
                bias: list[torch.Tensor] | None = None, activation_quantized: bool = False, tp: int = TP) -> None:
    x = torch.randn(5, input_size, generator=torch.Generator().manual_seed(0))
    with use_ops(reference_ops()):
        whole_layer = build(quant_config, prefix, LinearPartition.replicated(input_size, sizes, prefix),
                            bias is not None)
        whole = whole_layer.quant_method.apply(load(whole_layer, shards, fused, bias), x)
        outs = []
        for partition in partitions(kind, input_size, sizes, prefix, tp, units):
            layer = load(build(quant_config, prefix, partition, bias is not None), shards, fused, bias)
            kernels = getattr(layer, "quant_kernels", None) or layer.gguf_kernels
            assert sum(k.out_features for k in kernels) == sum(partition.local_output_sizes)
            assert {k.in_features for k in kernels} == {partition.local_input_size}, "the rank holds its part only"
            local_x = x.narrow(1, *partition.input_slice)
            outs.append((partition, layer.quant_method.apply(layer, local_x)))
    if kind == "row":
        total = sum(out for _, out in outs)
        if activation_quantized:
            # Each rank quantizes its own slice of the activations per token (as vLLM's ranks do): the partial
            # sums carry different activation rounding than the whole layer's, of the order of int8's step.
            error = ((total - whole).norm() / whole.norm()).item()
            assert error < 1e-2, f"{prefix}: row ranks' sum is {error:.2e} away from the whole layer"
        else:
            torch.testing.assert_close(total, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
        return
    pieces = []  # each shard's distinct rank slices in order, shards in order: the whole layer's layout
    for index in range(len(sizes)):
        by_start = {}
        for partition, out in outs:
            local = partition.local_output_sizes
            piece = out.narrow(1, sum(local[:index]), local[index])
            start = partition.output_slices[index][0]
            if start in by_start:  # a replicated unit (fewer KV heads than ranks): the copies agree
                torch.testing.assert_close(piece, by_start[start], rtol=0, atol=0)
            by_start[start] = piece
        pieces += [by_start[start] for start in sorted(by_start)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


@pytest.mark.parametrize("name,layers", CASES, ids=[c[0] for c in CASES])
def test_ranks_match_whole_layer(name, layers):
    ckpt, quant_config = checkpoint(name)
    for key in layers:
        prefix, sources, input_size, kind = LAYERS[key]
        shards = [layer_tensors(ckpt, s) for s in sources]
        sizes = shard_sizes(quant_config, prefix, input_size, shards)
        units = [HEAD] * len(sizes) if key == "qkv" else None
        check_ranks(quant_config, prefix, kind, input_size, sizes, shards, units,
                    activation_quantized=name == "ct_w8a8_int8")


def fuse(shards: list[dict[str, torch.Tensor]], layouts: dict) -> dict[str, torch.Tensor]:
    """The shards' tensors as one fused checkpoint tensor each (Phi-3's qkv_proj): concatenated along the
    output features, or the first shard's where none runs over them."""
    fused = {}
    for name in shards[0]:
        dim = layouts[name].out_dim
        fused[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return fused


@pytest.mark.parametrize("name", ["awq_g32", "gptq_sym_g32", "ct_w8a16"])
def test_fused_qkv_splits_into_shards(name):
    ckpt, quant_config = checkpoint(name)
    prefix, sources, input_size, _ = LAYERS["qkv"]
    shards = [layer_tensors(ckpt, s) for s in sources]
    probe = build(quant_config, prefix, LinearPartition.replicated(input_size, [1], prefix))
    layouts = probe.quant_method.tensor_layouts(probe)
    sizes = [output_size(s, layouts) for s in shards]
    fused = fuse(shards, layouts)
    if "weight_shape" in fused:
        fused["weight_shape"] = torch.tensor([sum(sizes), input_size])
    check_ranks(quant_config, prefix, "column", input_size, sizes, [fused], [HEAD] * 3, fused=True)


@pytest.mark.parametrize("name", ["awq_g32", "gptq_asym_act_g32"])
def test_kv_heads_replicated_over_more_ranks(name):
    """Four ranks over two KV heads: each k/v head (a whole number of packed words) is held by two ranks."""
    ckpt, quant_config = checkpoint(name)
    prefix, sources, input_size, _ = LAYERS["qkv"]
    shards = [layer_tensors(ckpt, s) for s in sources]
    sizes = shard_sizes(quant_config, prefix, input_size, shards)
    check_ranks(quant_config, prefix, "column", input_size, sizes, shards, [HEAD] * 3, tp=4)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_bias_is_split_or_added_once(kind):
    ckpt, quant_config = checkpoint("gptq_sym_g32")
    key = "qkv" if kind == "column" else "o"
    prefix, sources, input_size, _ = LAYERS[key]
    shards = [layer_tensors(ckpt, s) for s in sources]
    sizes = [s["scales"].shape[1] for s in shards]
    bias = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    check_ranks(quant_config, prefix, kind, input_size, sizes, shards, [HEAD] * 3 if key == "qkv" else None,
                bias=bias)


@pytest.mark.parametrize("name,key,tp,pattern", [
    ("gptq_sym_g32", "down", 16, r"down_proj\.(scales|qzeros): .* 32 features; tensor_parallel_size 16"),
    ("awq_g32", "o", 8, r"o_proj\.(scales|qzeros): .* 32 features; tensor_parallel_size 8"),
    ("fp8_block", "o", 2, r"o_proj\.weight_scale_inv: .* 128 features; tensor_parallel_size 2"),
    ("fp8_block", "qkv", 2, r"qkv_proj\.weight_scale_inv: .* 128 features; tensor_parallel_size 2"),
    ("ct_w4a16", "o", 4, r"o_proj\.(weight_scale): .* 64 features; tensor_parallel_size 4"),
    ("aqlm_2x8", "o", 32, r"o_proj\.codes: .* 8 features; tensor_parallel_size 32"),
])
def test_split_cutting_a_group_is_an_error(name, key, tp, pattern):
    ckpt, quant_config = checkpoint(name)
    prefix, sources, input_size, kind = LAYERS[key]
    shards = [layer_tensors(ckpt, s) for s in sources]
    sizes = shard_sizes(quant_config, prefix, input_size, shards)
    units = [HEAD] * len(sizes) if key == "qkv" else None
    partition = partitions(kind, input_size, sizes, prefix, tp, units)[0]
    with pytest.raises(ValueError, match=pattern):
        load(build(quant_config, prefix, partition), shards)


def test_quantized_lm_head_loads_its_vocabulary_rows():
    """GPTQ's quantized ``lm_head`` (8-bit here) on each rank: its rows of the logits."""
    ckpt, quant_config = checkpoint("gptq_lm_head")
    tensors = layer_tensors(ckpt, "lm_head")
    vocab, width = tensors["scales"].shape[1], 128
    hidden = torch.randn(3, width, generator=torch.Generator().manual_seed(1))
    logits = []
    with use_ops(reference_ops()):
        for partition in [VocabPartition(vocab, 0, 1)] + [VocabPartition(vocab, r, TP) for r in range(TP)]:
            layer = nn.Module()
            layer.vocab_partition = partition
            method = quant_config.get_embedding_method("lm_head")
            method.create_weights(layer, partition.rows, width, torch.float32)
            for name, value in tensors.items():
                getattr(layer, name).weight_loader(getattr(layer, name), value)
            method.process_weights_after_loading(layer)
            logits.append(method.logits(layer, hidden))
    torch.testing.assert_close(torch.cat(logits[1:], dim=1)[:, :vocab], logits[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- GGUF
def gguf_record(qtype, rows: int, cols: int, seed: int):
    from pagoda.quantization.gguf import GGUFWeight

    return GGUFWeight(f"blk.{seed}", torch.from_numpy(random_blocks(qtype, rows, cols, seed=seed)), qtype,
                      (rows, cols))


def gguf_config():
    return get_registry().get_quantization_method("gguf").from_config({})


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_gguf_linear_ranks(type_name, kind):
    from gguf.constants import GGMLQuantizationType as T

    qtype = T[type_name]
    input_size = 512  # two 256-value K-quant blocks per row: one per row rank
    sizes = [128, 64, 64] if kind == "column" else [96]
    shards = [{"weight": gguf_record(qtype, n, input_size, seed=i)} for i, n in enumerate(sizes)]
    units = [HEAD] * 3 if kind == "column" else None
    check_ranks(gguf_config(), "model.layers.0.self_attn.qkv_proj", kind, input_size, sizes, shards, units)


def test_gguf_row_split_cutting_a_block_is_an_error():
    from gguf.constants import GGMLQuantizationType as T

    prefix = "model.layers.0.mlp.down_proj"
    partition = LinearPartition.row(256, [64], 0, TP, prefix)
    with pytest.raises(ValueError, match=r"down_proj\.weight \(Q4_K, blocks of 256 inputs\).*tensor_parallel_size 2"):
        load(build(gguf_config(), prefix, partition), [{"weight": gguf_record(T.Q4_K, 64, 256, seed=0)}])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K"])
def test_gguf_embedding_rows(type_name):
    """An embedding table / LM head: each rank loads its vocabulary rows (the last one zero-padded) and serves
    lookups and logits for them."""
    from gguf.constants import GGMLQuantizationType as T

    vocab, width = 101, 256
    record = gguf_record(T[type_name], vocab, width, seed=3)
    ids = torch.tensor([0, 5, 50, 51, 100])
    hidden = torch.randn(2, width, generator=torch.Generator().manual_seed(2))
    results = []
    with use_ops(reference_ops()):
        for partition in [VocabPartition(vocab, 0, 1)] + [VocabPartition(vocab, r, TP) for r in range(TP)]:
            layer = nn.Module()
            layer.vocab_partition = partition
            method = gguf_config().get_embedding_method("model.embed_tokens")
            method.create_weights(layer, partition.rows, width, torch.float32)
            layer.weight.weight_loader(layer.weight, record)
            method.process_weights_after_loading(layer)
            mine = (ids >= partition.start) & (ids < partition.start + partition.num_real_rows)
            rows = method.embed(layer, (ids - partition.start).clamp(0, partition.rows - 1))
            results.append((rows * mine[:, None], method.logits(layer, hidden), partition))
    (whole_rows, whole_logits, _), ranks = results[0], results[1:]
    torch.testing.assert_close(sum(r for r, _, _ in ranks), whole_rows)
    logits = torch.cat([lg for _, lg, _ in ranks], dim=1)
    torch.testing.assert_close(logits[:, :vocab], whole_logits, rtol=1e-5, atol=1e-4)
    assert torch.all(logits[:, vocab:] == 0), "the padded row gives a zero logit"


# ---------------------------------------------------------------------------------------------------- CT act-order
def _pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit codes packed 8 to an int32 along ``dim``, least significant first (compressed-tensors' packing)."""
    moved = codes.to(torch.int64).movedim(dim, -1)
    words = (moved.unflatten(-1, (-1, 8)) << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).movedim(-1, dim)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_compressed_tensors_act_order_groups(kind):
    """``actorder: group`` W4A16 with zero points (groups scattered over the inputs by ``weight_g_idx``): row
    ranks keep every group's scales, as GPTQ's desc_act."""
    n, k, group = 64, 128, 32
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)].to(torch.int32)
    tensors = {"weight_packed": _pack_int32(codes, 1), "weight_zero_point": _pack_int32(zeros, 0),
               "weight_scale": torch.rand(n, k // group, generator=gen) * 0.02 + 0.01,
               "weight_shape": torch.tensor([n, k]), "weight_g_idx": g_idx}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group,
                                           "symmetric": False, "actorder": "group"}}}}
    quant_config = get_registry().get_quantization_method("compressed-tensors").from_config(config)
    check_ranks(quant_config, "model.layers.0.mlp.down_proj", kind, k, [n], [tensors])


def test_act_order_row_ranks_on_the_selected_bf16_kernels():
    """The padded act-order groups through the kernels this platform picks for bf16 (the compact 4-bit ones)."""
    from pagoda.ops import select_ops
    from pagoda.platforms import resolve_platform

    ckpt, quant_config = checkpoint("gptq_asym_act_g32")
    prefix, sources, input_size, _ = LAYERS["down"]
    shards = [layer_tensors(ckpt, s) for s in sources]
    x = torch.randn(5, input_size, generator=torch.Generator().manual_seed(0))
    outs = []
    with use_ops(select_ops(resolve_platform(), torch.bfloat16)):
        for partition in [LinearPartition.replicated(input_size, [128], prefix)] + partitions("row", input_size,
                                                                                             [128], prefix):
            layer = load(build(quant_config, prefix, partition, dtype=torch.bfloat16), shards)
            outs.append(layer.quant_method.apply(layer, x.narrow(1, *partition.input_slice).bfloat16()).float())
    whole, total = outs[0], outs[1] + outs[2]
    error = ((total - whole).norm() / whole.norm()).item()
    assert error < 1e-2, f"row ranks' sum is {error:.2e} away from the whole layer in bf16"
