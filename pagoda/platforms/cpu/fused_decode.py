"""Fused decode steps on the CPU: a declared decoder layer stack run by one native call per step.

At small batches a decode step is ~10 ms of weight streaming, and issuing ~12 kernels per layer from Python
costs another ~6 ms. :meth:`CpuPlatform.fused_decode` is given the model's :class:`DecoderStack` (the layers'
weights as the chosen ops' handles) and the engine's ops; when every op of the stack is one of this platform's
native kernels it returns a :class:`FusedDecode`, which hands the whole layer loop of a decode-only step to
``pagoda_decode_layers`` (``kernels/csrc/cpu_decode.cpp``). Every stack recipe is fused: ``"llama"``, ``"gemma"``
and ``"gpt"`` (OPT, GPT-2); a Llama stack's layers may route to experts in place of their MLP (Mixtral,
Qwen3-MoE), with a shared expert beside them (Qwen2-MoE). The step calls the same kernels in the same order, so its
numbers are those of the per-op path, with two exceptions: the per-op LayerNorm takes torch's below
``LAYER_NORM_MIN_ELEMENTS`` (where one call from Python costs more than the work), and from 32 rows torch's sigmoid
of Qwen2-MoE's shared-expert gate takes a vectorised exp; either may round a last bit differently from the native
kernel. It plays the part CUDA graphs play on a GPU. On AMX CPUs the GEMMs run on AMX tiles as the AMX linear op
runs them, and only steps small enough for its packed-weight kernels are fused (it hands prefill-sized batches to
oneDNN). When the engine serves LoRA adapters through this platform's native ``lora_shrink_expand``, the step adds
each layer's adapter delta with the same kernel the per-op path calls; with another implementation, steps that have
adapter rows run layer by layer.
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import c_double, c_float, c_int64, c_void_p
from typing import Any

import torch

from pagoda.attention_backends.torch_sdpa import SdpaMetadata
from pagoda.ops.reference_attention import DecodePlan
from pagoda.platforms.cpu import ops as cpu_op_impls
from pagoda.platforms.cpu import quant_ops as cpu_quant_op_impls
from pagoda.platforms.cpu.kernels import cpu, cpu_moe, cpu_ops, cpu_quant_ops
from pagoda.platforms.cpu.kernels.cpu_ops import PackedQuant, PackedWeight
from pagoda.platforms.cpu.lora_ops import NativeLoRAShrinkExpand
from pagoda.platforms.cpu.moe_ops import NativeMoeTopK, PackedFusedMoE

logger = logging.getLogger(__name__)

#: Each recipe's ops whose native kernels the fused step calls: fusing is only exact when the per-op path calls
#: them too.
_ATTENTION_OPS = {"write_kv": cpu_op_impls.NativeWriteKV, "paged_decode_attention": cpu_op_impls.NativeDecodeAttention}
_LLAMA_OPS = {"rms_norm": cpu_op_impls.NativeRmsNorm, "rotary_embedding": cpu_op_impls.NativeRotary,
              **_ATTENTION_OPS}
_NATIVE_OPS = {
    "llama": _LLAMA_OPS,
    "gemma": _LLAMA_OPS,
    "gpt": {"layer_norm": cpu_op_impls.NativeLayerNorm, "activation": cpu_op_impls.NativeActivation, **_ATTENTION_OPS},
}
#: cpu_decode.cpp's Recipe, and the MLP activations each recipe can run: (the library's code, the op and its native
#: implementation the per-op path must be calling).
_RECIPES = {"llama": 0, "gpt": 1, "gemma": 2}
_SILU = (cpu_ops.GATED_ACTIVATIONS["silu"], "silu_and_mul", cpu_op_impls.NativeSiluAndMul)
_GELU_TANH = (cpu_ops.GATED_ACTIVATIONS["gelu_tanh"], "gelu_and_mul", cpu_op_impls.NativeGeluAndMul)
_GATED = {"silu": _SILU, "gelu_pytorch_tanh": _GELU_TANH, "gelu_new": _GELU_TANH}  # Hugging Face hidden_act names
_ACTIVATIONS = {"llama": _GATED, "gemma": _GATED,
                "gpt": {name: (code, "activation", cpu_op_impls.NativeActivation)
                        for name, code in cpu_ops.NATIVE_ACTIVATIONS.items()}}


class _Linear(ctypes.Structure):
    _fields_ = [("kind", c_int64), ("data", c_void_p), ("bias", c_void_p), ("n", c_int64), ("k", c_int64),
                ("input_order", c_void_p), ("input_scale", c_float)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in ("input_norm", "post_norm", "input_norm_bias", "post_norm_bias",
                                              "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")] + [
        ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("k_cache", c_void_p),
        ("v_cache", c_void_p), ("window", c_int64), ("rope_table", c_int64), ("lora", c_void_p * 4),
        ("experts", c_void_p)]


class _Experts(ctypes.Structure):
    _fields_ = [("router", _Linear), ("w13", c_void_p), ("w2", c_void_p)] + [
        (name, c_int64) for name in ("num_experts", "inter", "top_k", "renormalize", "round_weights", "amx")] + [
        ("shared_gate_up", _Linear), ("shared_down", _Linear), ("shared_gate", _Linear), ("shared_inter", c_int64),
        ("shared_lora", c_void_p * 2), ("lora", c_void_p)]


class _Plan(ctypes.Structure):
    _fields_ = [(name, c_int64) for name in ("recipe", "activation", "num_layers", "hidden", "num_heads",
                                             "num_kv_heads", "head_size", "inter", "rot_dim", "block_size",
                                             "block_stride", "token_stride", "amx", "lora_amx")] + [
        ("eps", c_float), ("scale", c_float), ("soft_cap", c_float), ("layers", ctypes.POINTER(_Layer)),
        ("phase_seconds", ctypes.POINTER(c_double))]

#: The phases of a layer the step can time (cpu_decode.cpp's Phase, in its order), summed over the layers: the norms
#: (residual adds included), the projections, q/k norms (Qwen3, Gemma 3), rotary, the KV-cache write, decode
#: attention, the MLP's activation, routed experts (router, top-k and expert MLPs) and the LoRA adapter deltas.
PHASES = ("norms", "qkv_proj", "qk_norms", "rotary", "write_kv", "attention", "o_proj", "mlp_in", "activation",
          "mlp_out", "experts", "lora")


class NotFusable(Exception):
    """Why a model's decode steps can't be fused (kept for the log)."""


# cpu_decode.cpp's kInt8AmxKind / kInt8VnniKind: a PackedInt8 weight, activations quantized per token (or by the
# layer's static input scale), multiplied on AMX-INT8 tiles / with AVX512-VNNI (as the layer's linear_int8
# implementation does); kCodebookKind: a PackedCodebook (AQLM) weight's descriptor.
INT8_AMX_KIND, INT8_VNNI_KIND, CODEBOOK_KIND = 200, 201, 300


def _bias_ptr(kernel: Any, keep: list) -> int | None:
    """A float32 copy of a quantized layer's bias (kept alive in ``keep``), as the native step adds it."""
    if kernel.bias is None:
        return None
    bias = kernel.bias.detach().float().contiguous()
    keep.append(bias)
    return bias.data_ptr()


def _linear(kernel: Any, keep: list) -> tuple[_Linear, int | None]:
    """The native GEMM descriptor of a layer's kernel (with its input order, act-order GPTQ's), and the most rows it
    may take fused (None: any)."""
    linear, limit = _weight(kernel, keep)
    if kernel.input_order is not None:
        order = kernel.input_order.to(torch.int64).contiguous()
        if order.shape != (linear.k,):
            raise NotFusable(f"an input order of {tuple(order.shape)} for {linear.k} inputs")
        keep.append(order)
        linear.input_order = order.data_ptr()
    return linear, limit


def _weight(kernel: Any, keep: list) -> tuple[_Linear, int | None]:
    """:func:`_linear` without the input order."""
    handle, limit = kernel.handle, None
    if isinstance(kernel.op, cpu_op_impls.AmxDense):
        # The per-op path hands larger batches to oneDNN: fuse only what it runs on the packed weight.
        handle, limit = handle.packed, cpu_op_impls.ONEDNN_MIN_ROWS - 1
    if isinstance(handle, PackedWeight) and kernel.bias is None:
        return _Linear(0, handle.ptrs[0], handle.ptrs[1], handle.n, handle.k), limit
    if isinstance(handle, PackedQuant):
        return _Linear(handle.bits, handle.ptr, _bias_ptr(kernel, keep), handle.n, handle.k), limit
    if isinstance(handle, cpu_quant_op_impls.Int8Weight):  # a static input scale, or 0: quantized per token
        packed, kind = handle.packed, INT8_AMX_KIND if kernel.op.uses_amx else INT8_VNNI_KIND
        return _Linear(kind, packed.ptr, _bias_ptr(kernel, keep), packed.n, packed.k, None,
                       handle.input_scale or 0.0), limit
    if isinstance(handle, cpu_quant_ops.PackedCodebook):
        return _Linear(CODEBOOK_KIND, ctypes.addressof(handle.weight), _bias_ptr(kernel, keep), handle.n,
                       handle.k), limit
    raise NotFusable(f"a {type(kernel.op).__name__} weight is not on a native GEMM")


def _experts(experts: Any, linears: list[_Linear], shared_lora: list[int | None], ops: Any, keep: list) -> int:
    """The native step's descriptor of a layer's routed experts (kept alive in ``keep``), given the GEMM descriptors
    of its router and (where it has one) its shared expert's three projections: only where the per-op path runs the
    same native routing and expert kernels. The experts' adapter slots go with it (cpu_moe_lora.h), as the op's
    ``apply_lora`` passes them."""
    if not isinstance(ops.moe_topk, NativeMoeTopK):
        raise NotFusable(f"op moe_topk runs {type(ops.moe_topk).name}, not the native kernel")
    if not isinstance(experts.op, PackedFusedMoE) or experts.activation != "silu":
        raise NotFusable(f"experts on {type(experts.op).name} with {experts.activation}")
    handle, shared = experts.handle, experts.shared
    descriptor = _Experts(linears[0], handle.w13.data_ptr(), handle.w2.data_ptr(), experts.num_experts,
                          experts.intermediate_size, experts.top_k, int(experts.renormalize),
                          int(experts.round_weights), int(experts.op.uses_amx), *linears[1:4],
                          shared.intermediate_size if shared else 0, (c_void_p * 2)(*shared_lora))
    if experts.lora is not None:
        slots = cpu_moe.MoELoRASlots(experts.lora)
        keep.append(slots)
        descriptor.lora = ctypes.addressof(slots)
    keep.append(descriptor)
    return ctypes.addressof(descriptor)


class FusedDecode:
    """A model's decode-step plan: pointers to every layer's weights and KV cache, built once."""

    def __init__(self, stack: Any, ops: Any, kv_caches: list[torch.Tensor]) -> None:
        if stack.tensor_parallel_size > 1:  # the one native call has no all-reduce between layers
            raise NotFusable(f"layers split over tensor_parallel_size {stack.tensor_parallel_size} ranks")
        lib = cpu.kernels()
        if lib is None or not lib.has_packed_bf16:
            raise NotFusable("no native bf16 kernels")
        if stack.kind not in _RECIPES or stack.activation not in _ACTIVATIONS[stack.kind]:
            raise NotFusable(f"a {stack.kind} stack with {stack.activation}")
        if stack.attention_backend != "TORCH_SDPA":
            raise NotFusable(f"attention backend {stack.attention_backend}")
        activation, act_op, act_impl = _ACTIVATIONS[stack.kind][stack.activation]
        for op, impl in {**_NATIVE_OPS[stack.kind], act_op: act_impl}.items():
            if not isinstance(getattr(ops, op), impl):
                raise NotFusable(f"op {op} runs {type(getattr(ops, op)).name}, not the native kernel")
        # Every window's decode plan holds the same block table and lengths (the window is applied in the
        # kernel): the step reads the first layer's, and passes each layer its own window.
        self.window = stack.layers[0].sliding_window
        cache = kv_caches[0]
        if cache.dtype != torch.bfloat16 or cache.dim() != 5 or not cache.is_contiguous():
            raise NotFusable(f"KV cache {cache.dtype} {tuple(cache.shape)}")
        self.lib, self.stack, self.keep = lib, stack, []
        self.max_tokens: int | None = None
        self._phase_seconds: ctypes.Array | None = None  # per-phase sums while profiling
        # AMX tiles for the GEMMs exactly where the per-op path takes them (the AMX linear ops).
        self.amx = isinstance(ops.linear_dense, cpu_op_impls.AmxDense)
        # Adapters: applied in the step where the slots are the native kernel's, else such steps are declined.
        self.lora_step = stack.lora_step
        self.lora_fused = isinstance(getattr(self.lora_step, "op", None), NativeLoRAShrinkExpand)
        layers = (_Layer * len(stack.layers))()
        for i, (layer, kv) in enumerate(zip(stack.layers, kv_caches)):
            norms = [w if w is None else w.contiguous() for w in (
                layer.input_norm, layer.post_attention_norm, layer.input_norm_bias, layer.post_attention_norm_bias,
                layer.pre_mlp_norm, layer.post_mlp_norm, layer.q_norm, layer.k_norm)]
            if any(w is not None and w.dtype != torch.bfloat16 for w in norms):
                raise NotFusable("norm weights are not bfloat16")
            self.keep.extend(w for w in norms if w is not None)
            if kv.shape != cache.shape or kv.dtype != cache.dtype or not kv.is_contiguous():
                raise NotFusable("KV caches of different layouts")
            linears, experts = [], layer.experts
            shared = experts.shared if experts is not None else None
            if shared is not None and shared.activation != stack.activation:
                raise NotFusable(f"a shared expert with {shared.activation} in a stack with {stack.activation}")
            kernels = (layer.qkv, layer.o, layer.gate_up, layer.down)
            if experts is not None:  # the router, then the shared expert's projections (None: no shared expert)
                kernels += (experts.router,) + ((shared.gate_up, shared.down, shared.gate) if shared else (None,) * 3)
            for kernel in kernels:
                if kernel is None:  # the MLP's projections of a layer with routed experts; no shared expert
                    linears.append(_Linear())
                    continue
                if getattr(kernel.op, "uses_amx", self.amx) != self.amx:
                    raise NotFusable("quantized layers and dense ones disagree on AMX tiles")
                linear, limit = _linear(kernel, self.keep)
                linears.append(linear)
                if limit is not None:
                    self.max_tokens = min(limit, self.max_tokens or limit)
            lora = self._slot_pointers(layer.lora or (None,) * 4)
            shared_lora = self._slot_pointers(shared.lora if shared and shared.lora else (None,) * 2)
            layers[i] = _Layer(*(None if w is None else w.data_ptr() for w in norms), *linears[:4],
                               kv[0].data_ptr(), kv[1].data_ptr(), layer.sliding_window or 0, layer.rope_table,
                               (c_void_p * 4)(*lora),
                               None if experts is None else _experts(experts, linears[4:], shared_lora, ops, self.keep))
        self.layers = layers
        _, _, block_size, kv_heads, head_size = cache.shape
        self.hidden, self.inter = stack.hidden_size, stack.intermediate_size
        self.qkv_n = (stack.num_heads + 2 * stack.num_kv_heads) * stack.head_size
        self.q_size = stack.num_heads * stack.head_size
        self.plan = _Plan(_RECIPES[stack.kind], activation, len(stack.layers), self.hidden, stack.num_heads,
                          stack.num_kv_heads, stack.head_size, self.inter, stack.rotary_dim, block_size,
                          cache.stride(1), cache.stride(2), int(self.amx),
                          int(self.lora_fused and self.lora_step.op.uses_amx), stack.norm_eps, stack.attention_scale,
                          stack.attention_soft_cap or 0.0, ctypes.cast(layers, ctypes.POINTER(_Layer)))

    def profile(self, on: bool = True) -> None:
        """Time each phase of the layer loop (:data:`PHASES`) from the next step on, or stop timing: one clock read
        a phase and layer, inside the native step; phases a layer does not have stay at zero."""
        self._phase_seconds = (c_double * len(PHASES))() if on else None
        self.plan.phase_seconds = ctypes.cast(self._phase_seconds, ctypes.POINTER(c_double)) if on else None

    def take_phase_times(self) -> dict[str, float]:
        """Seconds spent in each phase by the steps since the last call (or since :meth:`profile`), all layers
        together; the sums restart from zero. Empty when not profiling."""
        sums = self._phase_seconds
        if sums is None:
            return {}
        taken = dict(zip(PHASES, sums))
        ctypes.memset(sums, 0, ctypes.sizeof(sums))
        return taken

    def _slot_pointers(self, slots: tuple[Any, ...]) -> list[int | None]:
        """Each projection's adapter slots as the native step reads them (None: no slots, or not the native op's)."""
        return [s.slots.pointer if self.lora_fused and s is not None else None for s in slots]

    def applies(self, metadata: Any, num_tokens: int) -> bool:
        """A decode-only step, small enough where the linear op changes kernels with the batch size, whose adapter
        rows (if any) this step can apply (those of the native slots)."""
        # The native step reads the paged decode attention's plans, which only TORCH_SDPA's metadata carries.
        plan = metadata.decode_plans.get(self.window) if isinstance(metadata, SdpaMetadata) else None
        return (type(plan) is DecodePlan and metadata.num_decodes == num_tokens and not metadata.prefills
                and (self.max_tokens is None or num_tokens <= self.max_tokens)
                and (self.lora_step is None or self.lora_step.plan is None or self.lora_fused))

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer for this step: ``hidden`` (embeddings) → (last layer output, residual), before the final
        norm."""
        tokens = hidden.shape[0]
        hidden = hidden.contiguous()
        residual = torch.empty_like(hidden)
        cos = sin = None
        if self.stack.rope is not None:
            cos, sin = (t.contiguous() for t in self.stack.rope(positions))
        scratch = torch.empty(tokens * (self.hidden + self.qkv_n + self.q_size + 3 * self.inter), dtype=torch.bfloat16)
        plan = metadata.decode_plans[self.window]
        table, seq_lens = plan.block_table, plan.seq_lens.contiguous()
        slots = metadata.slot_mapping.contiguous()
        lora = self.lora_step.plan if self.lora_step is not None else None  # the step's tokens grouped by slot
        rc = self.lib.decode_layers(ctypes.byref(self.plan), tokens, hidden.data_ptr(), residual.data_ptr(),
                                    cos.data_ptr() if cos is not None else None,
                                    sin.data_ptr() if sin is not None else None, slots.data_ptr(), table.data_ptr(),
                                    table.stride(0), seq_lens.data_ptr(), scratch.data_ptr(),
                                    lora.pointer if lora else None,
                                    self.lora_step.scales.data_ptr() if lora else None, torch.get_num_threads())
        if rc == -2:
            raise ValueError("fused decode step: the router chose an expert id out of range")
        if rc != 0:
            raise RuntimeError(f"pagoda_decode_layers failed with code {rc}")
        return hidden, residual


def build_fused_decode(stack: Any, ops: Any, kv_caches: list[torch.Tensor]) -> FusedDecode | None:
    """The fused decode step of ``stack``, or None (the reason logged) when the platform declines."""
    try:
        fused = FusedDecode(stack, ops, kv_caches)
    except NotFusable as exc:
        logger.info("decode steps not fused: %s", exc)
        return None
    limit = f" of up to {fused.max_tokens} sequences" if fused.max_tokens else ""
    lora = ""
    if fused.lora_step is not None:
        lora = (", LoRA adapters included" if fused.lora_fused else
                f"; steps with LoRA adapter rows run layer by layer (lora_shrink_expand is "
                f"{type(fused.lora_step.op).name}, not the native kernel)")
    logger.info("decode steps%s run fused on the native CPU kernels%s", limit, lora)
    return fused
