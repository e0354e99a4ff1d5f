"""The model interface: what the engine may ask of a model, and how a model describes its layer stack.

Every registered model class derives from :class:`PagodaModel`. The engine calls nothing else on a model:

* class attributes ``supported_tasks``, ``is_encoder_only``, ``uses_token_type_ids``, ``supports_pp`` and the
  classmethod ``max_model_len_limit(text_config)`` — read while the configuration is resolved, before the model exists;
* ``forward(input_ids, positions, kv_caches, metadata, **inputs)`` → hidden states ``[num_tokens, hidden]``
  (with pipeline parallelism, ``inputs`` holds ``intermediate_tensors`` and non-last stages return theirs);
* ``compute_logits(hidden)`` → float32 logits, ``compute_greedy(hidden)`` → their argmax or ``None``;
* ``get_pooler()`` — the pooling head of a pooling model (``None`` for generative ones);
* ``load_weights(weights)`` → the names of the parameters it loaded;
* ``decoder_stack()`` → a :class:`DecoderStack` a platform may fuse (:meth:`Platform.fused_decode`), or ``None``;
  ``use_fused_decode(step)`` hands the model what the platform returned;
* ``stacked_params`` and ``module_path(path)`` — how the modules a checkpoint or a LoRA adapter names map onto the
  model's own (merged projections; renamed blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class LinearKernel:
    """A linear layer as the op implementation that multiplies by it and that implementation's weight handle
    (what a quantization method's ``kernel(layer)`` exposes), with a bias the handle does not hold."""

    op: Any  # an OpImpl instance
    handle: Any
    bias: torch.Tensor | None = None
    #: The order of the layer's inputs the handle's columns follow (GPTQ act-order: int64 indices, the handle
    #: multiplies ``x[:, input_order]``), or None for the layer's own order.
    input_order: torch.Tensor | None = None


@dataclass
class SharedExpert:
    """Qwen2-MoE's shared expert: a gated MLP every token takes (``gate_up`` fused, then ``down``, with the layer's
    activation), its output scaled by ``sigmoid`` of the one-output ``gate`` projection, each product rounded to the
    model dtype, then added to the routed experts' output."""

    gate_up: LinearKernel | None  # None (each): a quantization that exposes no kernel handle (not fusable)
    down: LinearKernel | None
    gate: LinearKernel | None
    intermediate_size: int
    activation: str
    lora: tuple[Any, Any] | None = None  # the adapter slots of gate_up and down, as DecoderLayerSpec.lora


@dataclass
class RoutedExperts:
    """A layer's mixture of experts in place of its MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): the ``router`` projection,
    the ``moe_topk`` op's choice of each token's ``top_k`` experts (weights ``renormalize``-d, and rounded to the
    model dtype where ``round_weights``), the ``fused_moe`` op's ``handle`` over ``num_experts`` gated MLPs of
    ``intermediate_size`` with ``activation``, the ``shared`` expert where the block has one, and the experts' LoRA
    adapter slots (``lora``: :class:`pagoda.lora.experts.ExpertsLoRA`) where the engine serves adapters."""

    router: LinearKernel | None  # None: the router's quantization exposes no kernel handle (not fusable)
    op: Any  # the fused_moe OpImpl instance
    handle: Any
    num_experts: int
    intermediate_size: int
    top_k: int
    renormalize: bool
    round_weights: bool
    activation: str
    shared: SharedExpert | None = None
    lora: Any = None


@dataclass
class DecoderLayerSpec:
    """One pre-norm decoder layer: norm → attention (fused QKV) → norm (+residual) → MLP, as its stack's ``kind``
    says. ``gate_up`` is the MLP's first projection (gate and up fused in a gated MLP, ``fc1`` in a plain one) and
    ``down`` its second; both None where ``experts`` replaces the MLP."""

    input_norm: torch.Tensor | None  # None: a LayerNorm without elementwise affine
    post_attention_norm: torch.Tensor | None
    qkv: LinearKernel
    o: LinearKernel
    gate_up: LinearKernel | None
    down: LinearKernel | None
    sliding_window: int | None
    #: The LoRA adapter slots of qkv, o, gate_up and down (``pagoda.lora.layers.LinearLoRA``, or None for a layer
    #: without) when the engine serves adapters; their ``slots`` are the ``lora_shrink_expand`` op's layout.
    lora: tuple[Any, Any, Any, Any] | None = None
    #: The norms' biases (LayerNorm recipes), or None.
    input_norm_bias: torch.Tensor | None = None
    post_attention_norm_bias: torch.Tensor | None = None
    #: Gemma 2/3: ``post_attention_norm`` norms the attention's output, ``pre_mlp_norm`` the stream before the MLP
    #: and ``post_mlp_norm`` the MLP's output. Qwen3, Gemma 3: ``q_norm``/``k_norm`` norm each query and key head.
    pre_mlp_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    #: Which of the stack's rotary tables (``rope``'s first dimension, where it has several) rotates this layer.
    rope_table: int = 0
    #: The routed experts that replace the MLP (the "llama" recipe's MoE layers), or None.
    experts: RoutedExperts | None = None


@dataclass
class DecoderStack:
    """A declarative description of a decoder-only model's layer stack, enough to run its decode steps.

    ``kind`` names the layer recipe; in each the residual is added in the next norm:

    * ``"llama"``: RMSNorm, rotate-half rotary on a fused QKV projection (after per-head q/k norms where the layers
      have them: Qwen3), ``activation``-and-mul MLP on a fused gate/up projection, or routed experts in its place
      (Mixtral, Qwen2-MoE, Qwen3-MoE: :class:`RoutedExperts`; ``intermediate_size`` is then the dense layers', 0 if
      none);
    * ``"gpt"`` (OPT, GPT-2): LayerNorm with a bias, no rotary (the positions were embedded: ``rotary_dim`` 0,
      ``rope`` None), ``activation`` between the MLP's two projections, biases in the projections;
    * ``"gemma"``: Llama's, with RMSNorms scaling by ``1 + w`` and the layers' optional Gemma 2/3 norms (see
      :class:`DecoderLayerSpec`); ``rope`` returns ``[tables, T, rotary_dim]`` rows, one table per layer type."""

    kind: str
    layers: list[DecoderLayerSpec]
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    rotary_dim: int
    norm_eps: float
    attention_scale: float
    activation: str
    attention_backend: str
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None  # positions → float32 cos/sin rows
    ops: Any  # the OpSet the layers were built with
    #: Ranks the layers are split over: the linears hold this rank's part and the stack's step would need an
    #: all-reduce after each attention and MLP, which a platform's one-call fused step doesn't do.
    tensor_parallel_size: int = 1
    #: The engine's ``pagoda.lora.layers.LoRAStep`` when it serves adapters: the ``lora_shrink_expand`` op, and the
    #: step's plan (None while no row has an adapter) and per-slot scales, which a fused step must apply too.
    lora_step: Any = None
    #: The attention logits' soft cap (Gemma 2), or None.
    attention_soft_cap: float | None = None


class PagodaModel(nn.Module):
    """Base class of every model pagoda runs (see the module docstring for the contract)."""

    supported_tasks: ClassVar[tuple[str, ...]] = ("generate",)
    is_encoder_only: ClassVar[bool] = False
    uses_token_type_ids: ClassVar[bool] = False
    #: Whether the class can run as pipeline stages: it builds only its stage's layers (``make_layers``), takes
    #: ``intermediate_tensors`` and returns them from non-last stages (see :mod:`pagoda.distributed.pipeline`).
    supports_pp: ClassVar[bool] = False
    #: (merged, original, shard) for each projection the model merges (``qkv_proj`` from ``q_proj``, ``k_proj`` and
    #: ``v_proj``, ...): where a checkpoint's or an adapter's separate projections go.
    stacked_params: ClassVar[tuple[tuple[str, str, int], ...]] = ()

    @classmethod
    def max_model_len_limit(cls, text_config: Any) -> int | None:
        """The longest context this class can take for ``text_config``, when lower than the config says."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, **inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no language-model head")

    def compute_greedy(self, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        """``compute_logits(hidden).argmax(-1)`` without the logits, where the LM head's kernel can (else None).
        ``allowed``: a token bitmask per row (int32 [n, ceil(vocab / 32)], bit ``t % 32`` of word ``t // 32`` set:
        token ``t`` allowed — a grammar's constraint); the argmax is then over the allowed tokens only."""
        return None

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        raise NotImplementedError

    def module_path(self, path: str) -> str:
        """A module path as a checkpoint or a LoRA adapter names it, as this model names that module (where the
        model renames a block: Mixtral's ``block_sparse_moe`` is its ``mlp``)."""
        return path

    def get_pooler(self) -> nn.Module | None:
        """The pooling head (a submodule named ``pooler``) of a pooling model; None for generative models."""
        return self._modules.get("pooler")

    def decoder_stack(self) -> DecoderStack | None:
        return None

    def use_fused_decode(self, step: Any | None) -> None:
        """Run the decode steps ``step.applies`` to through ``step`` (``None``: every step layer by layer)."""
