"""The Llama family: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2/Qwen2.5 (qkv bias) and SmolLM
(tied embeddings), with grouped-query attention. Registered as a built-in plugin.

The model works on one flat batch of tokens (no padding): ``input_ids`` and ``positions`` are ``[num_tokens]``;
attention reads and writes each layer's paged KV cache through the backend metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.distributed.parallel_state import get_tp_group
from pagoda.distributed.pipeline import (first_stage_module, is_first_stage, is_last_stage, last_stage_module,
                                         make_layers, missing_prefixes, stage_inputs, stage_outputs)
from pagoda.distributed.tensor_parallel import heads_per_rank
from pagoda.models.interface import DecoderLayerSpec, DecoderStack, RoutedExperts
from pagoda.models.layers import (Attention, CausalLM, GatedActivation, Linear, RMSNorm, RotaryEmbedding,
                                  VocabEmbedding, load_param, merged_param_name, stack_kernels)
from pagoda.ops import current_ops
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import QuantizationConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype, backend: type[AttentionBackend], attn_config: AttentionConfig,
                 qkv_bias: bool, o_bias: bool, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        # This rank's heads (all of them on one rank); q/k/v split by whole heads, KV heads replicated when fewer
        self.num_heads, self.num_kv_heads = heads_per_rank(total_heads, total_kv_heads, get_tp_group().world_size)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.qkv_proj = Linear(config.hidden_size, [total_heads * self.head_size, total_kv_heads * self.head_size,
                                                    total_kv_heads * self.head_size], qkv_bias, quant_config,
                               f"{prefix}.qkv_proj", dtype, parallel="column", output_units=[self.head_size] * 3)
        self.o_proj = Linear(total_heads * self.head_size, [config.hidden_size], o_bias, quant_config,
                             f"{prefix}.o_proj", dtype, parallel="row")
        self.rotary = rotary  # shared by all layers
        self.attn = Attention(self.num_heads, self.head_size, self.num_kv_heads, backend, attn_config, sliding_window)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, kv_cache: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_size)
        k = k.view(-1, self.num_kv_heads, self.head_size)
        q, k = self.rotary(rope, q, k)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_size), kv_cache, metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """``down(act(gate) * up)`` on a fused gate/up projection; ``act`` defaults to the config's ``hidden_act``.
    Under tensor parallelism gate/up are column-split and down row-split (``reduce_output=False``: the caller sums
    the ranks' partial outputs)."""

    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 bias: bool, act: str | None = None, reduce_output: bool = True) -> None:
        super().__init__()
        self.act = GatedActivation(act or getattr(config, "hidden_act", "silu"))
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], bias, quant_config, f"{prefix}.gate_up_proj",
                                   dtype, parallel="column")
        self.down_proj = Linear(inter, [config.hidden_size], bias, quant_config, f"{prefix}.down_proj", dtype,
                                parallel="row", reduce_output=reduce_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP. Families that differ only in their attention or MLP (Qwen3's q/k norms, the
    mixture-of-experts blocks) subclass it and override ``attention_cls`` or :meth:`make_mlp`."""

    attention_cls: type[LlamaAttention] = LlamaAttention
    #: Whether the "llama" decoder-stack recipe computes this class's layers exactly. Each class says so itself
    #: (:meth:`LlamaModel.decoder_stack` reads the class's own attribute, never an inherited one), so a subclass
    #: with other maths, such as Qwen2-MoE's shared expert, is never fused by mistake.
    llama_recipe: ClassVar[bool] = True

    def __init__(self, config: Any, layer_idx: int, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype, backend: type[AttentionBackend], attn_config: AttentionConfig,
                 arch: dict[str, bool], rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx, quant_config, f"{prefix}.self_attn", dtype, backend,
                                            attn_config, arch["qkv_bias"], arch["o_bias"], rotary, sliding_window)
        self.mlp = self.make_mlp(config, layer_idx, quant_config, f"{prefix}.mlp", dtype, arch)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def make_mlp(self, config: Any, layer_idx: int, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype, arch: dict[str, bool]) -> nn.Module:
        return LlamaMLP(config, quant_config, prefix, dtype, arch["mlp_bias"])

    def routed_experts(self) -> RoutedExperts | None:
        """The routed experts in place of this layer's MLP, as a decoder stack declares them (None: the dense gated
        MLP)."""
        return None

    def forward(self, rope, hidden, residual, kv_cache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def llama_layer_kernels(layer: nn.Module, lora_step: Any,
                        experts: bool = False) -> tuple[list[Any], tuple[Any, ...], Any] | None:
    """:func:`stack_kernels` of a layer with Llama's projections (``self_attn.qkv_proj`` / ``o_proj``,
    ``mlp.gate_up_proj`` / ``down_proj``); with ``experts`` in place of the MLP, its two entries are None."""
    attn, mlp = layer.self_attn, layer.mlp
    if not experts:
        return stack_kernels((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj), lora_step)
    kernels = stack_kernels((attn.qkv_proj, attn.o_proj), lora_step)
    if kernels is None:
        return None
    linears, lora, lora_step = kernels
    return [*linears, None, None], (*lora, None, None), lora_step


class LlamaModel(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, arch: dict[str, bool],
                 max_positions: int, sliding_window: int | None | Sequence[int | None], prefix: str = "model",
                 layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        """``sliding_window``: every layer's window, or one per layer (``layer_types``: Qwen configs that slide
        only some layers)."""
        super().__init__()
        # Pipeline stages: the embedding on the first (and on the last, where the LM head is tied to it).
        self.embed_tokens = first_stage_module(
            lambda: VocabEmbedding(config.vocab_size, config.hidden_size, quant_config, f"{prefix}.embed_tokens",
                                   dtype), also_on_last=bool(getattr(config, "tie_word_embeddings", False)))
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(config, head_size, max_positions, dtype)
        windows = (list(sliding_window) if isinstance(sliding_window, Sequence) else
                   [sliding_window] * config.num_hidden_layers)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda i: layer_cls(config, i, quant_config, f"{prefix}.layers.{i}", dtype, backend, attn_config, arch,
                                self.rotary, windows[i]))
        self.norm = last_stage_module(lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype))
        self.is_first_stage, self.is_last_stage = is_first_stage(), is_last_stage()
        self.attn_backend = backend.name
        # A platform's fused decode step (Platform.fused_decode), set by the runner once the KV caches exist.
        self.fused_decode = None

    def decoder_stack(self) -> DecoderStack | None:
        """The layer stack as the ops' handles, for a platform to fuse; None when a layer isn't one op call."""
        if any(not vars(type(layer)).get("llama_recipe", False) for layer in self.layers):
            return None  # expert blocks, other layer maths, or layers on other pipeline stages
        layers, lora_step, epsilons, dense = [], None, set(), []
        for layer in self.layers:
            attn = layer.self_attn
            experts = layer.routed_experts()
            if experts is None:
                dense.append(layer.mlp)
            elif experts.router is None or (experts.shared is not None and None in (
                    experts.shared.gate_up, experts.shared.down, experts.shared.gate)):
                return None  # a projection whose quantization exposes no kernel handle
            kernels = llama_layer_kernels(layer, lora_step, experts is not None)
            if kernels is None:
                return None
            linears, lora, lora_step = kernels
            head_norms = [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]  # Qwen3's
            norms = [layer.input_layernorm, layer.post_attention_layernorm, *filter(None, head_norms)]
            epsilons |= {n.eps for n in norms}
            layers.append(DecoderLayerSpec(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                           *linears, attn.attn.impl.sliding_window,
                                           lora if lora_step is not None else None,
                                           q_norm=None if head_norms[0] is None else head_norms[0].weight,
                                           k_norm=None if head_norms[1] is None else head_norms[1].weight,
                                           experts=experts))
        attn = self.layers[0].self_attn
        if len(epsilons) != 1:
            return None
        # The dense MLPs' width and activation (a stack of expert layers only: the experts' activation).
        inter = dense[0].gate_up_proj.output_sizes[0] if dense else 0
        activation = dense[0].act.act if dense else next(s.experts.activation for s in layers)
        return DecoderStack("llama", layers, self.norm.weight.shape[0], attn.num_heads, attn.num_kv_heads,
                            attn.head_size, inter, self.rotary.rotary_dim, epsilons.pop(), attn.attn.impl.scale,
                            activation, self.attn_backend, self.rotary.lookup, current_ops(),
                            get_tp_group().world_size, lora_step)

    def forward(self, input_ids, positions, kv_caches, metadata, intermediate_tensors=None):
        """``kv_caches``: this stage's layers' caches. Non-first pipeline stages start from the previous stage's
        ``intermediate_tensors``; non-last ones return theirs (:class:`IntermediateTensors`)."""
        if self.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None
            fused = self.fused_decode  # never set with pipeline parallelism (the runner declines it)
            if fused is not None and fused.applies(metadata, hidden.shape[0]):
                hidden, residual = fused.run(hidden, positions, metadata)
                hidden, _ = self.norm(hidden, residual)
                return hidden
        else:
            hidden, residual = stage_inputs(intermediate_tensors)
        rope = self.rotary.lookup(positions)
        for layer, kv_cache in zip(islice(self.layers, self.start_layer, self.end_layer), kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, metadata)
        if not self.is_last_stage:
            return stage_outputs(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM. Subclasses change which projections carry a bias, or (``layer_cls``) the layer."""

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer
    supports_pp = True

    # checkpoint name → (our parameter, shard index)
    stacked_params = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def arch_flags(self, config: Any) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False))}

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        super().__init__()
        config = model_config.text_config
        dtype = model_config.dtype
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = LlamaModel(config, quant_config, dtype, attn_backend, attn_config, self.arch_flags(config),
                                model_config.max_model_len,
                                model_config.layer_sliding_windows or model_config.sliding_window,
                                layer_cls=self.layer_cls)
        self.init_lm_head(self.model.embed_tokens, config.hidden_size, quant_config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        """Hidden states ``[num_tokens, hidden_size]`` after the final norm (a non-last pipeline stage: its
        IntermediateTensors)."""
        return self.model(input_ids, positions, kv_caches, metadata, intermediate_tensors)

    def decoder_stack(self) -> DecoderStack | None:
        return self.model.decoder_stack()

    def use_fused_decode(self, step) -> None:
        self.model.fused_decode = step

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load checkpoint tensors by Hugging Face name; returns the names of the parameters that were loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        params.update(dict(self.named_buffers()))
        loaded: set[str] = set()
        elsewhere = missing_prefixes(self)  # modules of other pipeline stages
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            if not name.startswith(("model.", "lm_head.")):
                name = "model." + name  # checkpoints saved from the bare model
            name, shard = self.map_weight_name(name)
            if elsewhere and name.startswith(elsewhere):
                continue
            loaded.add(load_param(self, params, name, tensor, shard))
        return loaded


    def map_weight_name(self, name: str) -> tuple[str, Any]:
        """A checkpoint tensor's parameter name and its shard of that parameter (None: the whole of it)."""
        return merged_param_name(name, self.stacked_params)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    def arch_flags(self, config: Any) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}


@hookimpl
def pagoda_register_models():
    return {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
    }
