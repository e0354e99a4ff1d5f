"""Fused decode steps on the CPU: a Llama-family layer stack run by one native call per step.

At small batches a decode step is ~10 ms of weight streaming, and issuing ~12 kernels per layer from Python
costs another ~6 ms. When every layer of a model already runs on pagoda's native CPU kernels (bf16 packed or
block-quantized weights, the native decode attention of TORCH_SDPA), :class:`FusedDecode` hands the whole layer
loop of a decode-only step to ``pagoda_llama_decode`` (``pagoda/kernels/csrc/cpu_decode.cpp``), which calls the
same kernels in the same order: the numbers are those of the per-op path. Anything else — prefill chunks, other
weight formats or backends — keeps the per-op path. It plays the part CUDA graphs play on a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import c_float, c_int64, c_void_p
from typing import Any

import torch

from pagoda.attention_backends.torch_sdpa import SdpaImpl
from pagoda.kernels import cpu
from pagoda.kernels.cpu_ops import PackedQuant, PackedWeight

logger = logging.getLogger(__name__)


class _Linear(ctypes.Structure):
    _fields_ = [("kind", c_int64), ("data", c_void_p), ("bias", c_void_p), ("n", c_int64), ("k", c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", c_void_p), ("post_norm", c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", c_void_p), ("v_cache", c_void_p)]


class _Plan(ctypes.Structure):
    _fields_ = [(name, c_int64) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_size",
                                             "inter", "rot_dim", "block_size", "block_stride", "token_stride",
                                             "window")] + [("eps", c_float), ("scale", c_float),
                                                           ("layers", ctypes.POINTER(_Layer))]


class NotFusable(Exception):
    """Why a model's decode steps can't be fused (kept for the log)."""


def _linear(module: Any, keep: list) -> _Linear:
    packed = getattr(module, "packed_weight", None)
    if isinstance(packed, PackedWeight):
        return _Linear(0, packed.ptrs[0], packed.ptrs[1], packed.n, packed.k)
    kernels = getattr(module, "gguf_kernels", None)
    weight = getattr(kernels[0], "weight", None) if kernels is not None and len(kernels) == 1 else None
    if isinstance(weight, PackedQuant):
        bias = getattr(module, "bias", None)
        bias_ptr = None
        if bias is not None:
            bias = bias.detach().float().contiguous()
            keep.append(bias)
            bias_ptr = bias.data_ptr()
        return _Linear(weight.bits, weight.ptr, bias_ptr, weight.n, weight.k)
    raise NotFusable(f"{getattr(module, 'prefix', module)} is not on a native kernel")


class FusedDecode:
    """A model's decode-step plan: pointers to every layer's weights and KV cache, built once."""

    def __init__(self, model: Any, kv_caches: list[torch.Tensor]) -> None:
        lib = cpu.kernels()
        if lib is None or not lib.has_packed_bf16:
            raise NotFusable("no native bf16 kernels")
        self.lib, self.model, self.keep = lib, model, []
        first = model.layers[0]
        attn = first.self_attn
        impl = attn.attn.impl
        if not isinstance(impl, SdpaImpl):
            raise NotFusable(f"attention implementation {type(impl).__name__}")
        windows = {layer.self_attn.attn.impl.sliding_window for layer in model.layers}
        if len(windows) != 1:
            raise NotFusable("layers with different sliding windows")
        cache = kv_caches[0]
        if cache.dtype != torch.bfloat16 or cache.dim() != 5 or not cache.is_contiguous():
            raise NotFusable(f"KV cache {cache.dtype} {tuple(cache.shape)}")
        layers = (_Layer * len(model.layers))()
        for i, (layer, kv) in enumerate(zip(model.layers, kv_caches)):
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != torch.bfloat16 for w in norms):
                raise NotFusable("norm weights are not bfloat16")
            if kv.shape != cache.shape or kv.dtype != cache.dtype or not kv.is_contiguous():
                raise NotFusable("KV caches of different layouts")
            layers[i] = _Layer(norms[0].data_ptr(), norms[1].data_ptr(), _linear(layer.self_attn.qkv_proj, self.keep),
                               _linear(layer.self_attn.o_proj, self.keep), _linear(layer.mlp.gate_up_proj, self.keep),
                               _linear(layer.mlp.down_proj, self.keep), kv[0].data_ptr(), kv[1].data_ptr())
        self.layers = layers
        _, _, block_size, kv_heads, head_size = cache.shape
        self.hidden = model.norm.weight.shape[0]
        self.inter = first.mlp.gate_up_proj.output_sizes[0]
        self.qkv_n = (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_size
        self.q_size = attn.num_heads * attn.head_size
        self.plan = _Plan(len(model.layers), self.hidden, attn.num_heads, attn.num_kv_heads, attn.head_size,
                          self.inter, model.rotary.rotary_dim, block_size, cache.stride(1), cache.stride(2),
                          windows.pop() or 0, first.input_layernorm.eps, impl.scale,
                          ctypes.cast(layers, ctypes.POINTER(_Layer)))
        if first.input_layernorm.eps != first.post_attention_layernorm.eps:
            raise NotFusable("different norm epsilons")

    @staticmethod
    def applies(metadata: Any, num_tokens: int) -> bool:
        """A decode-only step whose metadata carries the native decode kernel's block table."""
        return (getattr(metadata, "decode_block_table", None) is not None and metadata.num_decodes == num_tokens
                and not metadata.prefills)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer for this step: ``hidden`` (embeddings) → (last layer output, residual), before the final
        norm."""
        tokens = hidden.shape[0]
        hidden = hidden.contiguous()
        residual = torch.empty_like(hidden)
        cos, sin = self.model.rotary.lookup(positions)
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
        scratch = torch.empty(tokens * (self.hidden + self.qkv_n + self.q_size + 3 * self.inter), dtype=torch.bfloat16)
        table, seq_lens = metadata.decode_block_table, metadata.decode_seq_lens.contiguous()
        slots = metadata.slot_mapping.contiguous()
        rc = self.lib.llama_decode(ctypes.byref(self.plan), tokens, hidden.data_ptr(), residual.data_ptr(),
                                   cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), table.data_ptr(), table.stride(0),
                                   seq_lens.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"pagoda_llama_decode failed with code {rc}")
        return hidden, residual


def fused_decode_for(model: Any, kv_caches: list[torch.Tensor], hidden: torch.Tensor) -> FusedDecode | None:
    """The model's fused decode plan, built on first use (after a first step has packed the weights), or None."""
    state = model.__dict__.get("_fused_decode")
    key = kv_caches[0].data_ptr() if kv_caches else None
    if state is not None and state[0] == key:
        return state[1]
    plan = None
    if hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and kv_caches:
        try:
            plan = FusedDecode(model, kv_caches)
            logger.info("decode steps run fused on the native CPU kernels")
        except NotFusable as exc:
            logger.debug("decode steps not fused: %s", exc)
    model.__dict__["_fused_decode"] = (key, plan)
    return plan
