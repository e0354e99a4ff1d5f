"""The Gemma family: Gemma, Gemma 2 and Gemma 3 (text). Registered as a built-in plugin.

What sets them apart from Llama (:mod:`pagoda.models.llama`), each as transformers computes it:

* RMSNorm scales by ``1 + w``, multiplied in float32 before the rounding to the activations' dtype (the
  ``rms_norm`` op's ``unit_offset``); embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the
  activations' dtype; the MLP is GeGLU (``gelu_pytorch_tanh`` and mul).
* Gemma 2 and 3: four norms per layer (after attention and after the MLP too, before each residual add), a softmax
  scale of ``query_pre_attn_scalar ** -0.5``, sliding-window layers interleaved with global ones
  (``layer_types``), and final-logit soft-capping; Gemma 2 also soft-caps the attention logits (the attention
  backend does it, from ``AttentionConfig.logits_soft_cap``).
* Gemma 3: RMSNorms on each head's queries and keys, and separate rotary tables for local (sliding) and global
  layers (``rope_parameters`` per layer type: ``rope_local_base_freq`` and the global base with its scaling).
  Multimodal checkpoints (``Gemma3ForConditionalGeneration``) run as their text model, for text prompts.

The layers are plain calls of the engine's ops, declared to a platform as a ``"gemma"`` decoder stack
(:meth:`GemmaModel.decoder_stack`) that it may fuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.distributed.parallel_state import get_tp_group
from pagoda.distributed.pipeline import (PPMissingLayer, first_stage_module, is_first_stage, is_last_stage,
                                         last_stage_module, stage_inputs, stage_layer_range, stage_outputs)
from pagoda.distributed.tensor_parallel import heads_per_rank
from pagoda.models.interface import DecoderLayerSpec, DecoderStack
from pagoda.models.layers import Attention, CausalLM, Linear, RMSNorm, RotaryEmbedding, VocabEmbedding
from pagoda.models.llama import LlamaForCausalLM, LlamaMLP, llama_layer_kernels
from pagoda.ops import current_ops
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import QuantizationConfig


class GemmaAttention(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, rotary: RotaryEmbedding,
                 sliding_window: int | None, scale: float, qk_norm: bool) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads = heads_per_rank(total_heads, total_kv_heads, get_tp_group().world_size)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(config.hidden_size, [total_heads * self.head_size, total_kv_heads * self.head_size,
                                                    total_kv_heads * self.head_size], bias, quant_config,
                               f"{prefix}.qkv_proj", dtype, parallel="column", output_units=[self.head_size] * 3)
        self.o_proj = Linear(total_heads * self.head_size, [config.hidden_size], bias, quant_config,
                             f"{prefix}.o_proj", dtype, parallel="row")
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps, dtype, unit_offset=True)
            self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps, dtype, unit_offset=True)
        self.rotary = rotary  # shared by the layers of one kind
        self.attn = Attention(self.num_heads, self.head_size, self.num_kv_heads, backend, attn_config,
                              sliding_window, scale)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, kv_cache: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # per head, before the rotation
            q = self.q_norm(q.reshape(-1, self.head_size))
            k = self.k_norm(k.reshape(-1, self.head_size))
        q = q.reshape(-1, self.num_heads, self.head_size)
        k = k.reshape(-1, self.num_kv_heads, self.head_size)
        q, k = self.rotary(rope, q, k)
        out = self.attn(q, k, v.reshape(-1, self.num_kv_heads, self.head_size), kv_cache, metadata)
        return self.o_proj(out)


class GemmaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP; with ``sandwich_norms`` (Gemma 2/3) each block's output is normed again
    before its residual add."""

    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 attention: GemmaAttention, sandwich_norms: bool) -> None:
        super().__init__()
        self.self_attn = attention
        # GeGLU; Gemma 1 names the activation hidden_act, Gemma 2/3 hidden_activation.
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp", dtype, False, act)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, dtype, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, unit_offset=True)
        self.sandwich_norms = sandwich_norms
        if sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, dtype, unit_offset=True)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, dtype, unit_offset=True)

    def forward(self, rope, hidden, residual, kv_cache, metadata):
        """Returns ``(block output, residual)``: the next norm adds them (the residual stream stays as
        transformers holds it, one add per block in the activations' dtype)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, metadata)
        if not self.sandwich_norms:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, max_positions: int,
                 layer_windows: list[int | None], version: int, prefix: str = "model") -> None:
        super().__init__()
        # Pipeline stages: the embedding on the first (and the last, when the LM head is tied to it).
        self.embed_tokens = first_stage_module(
            lambda: VocabEmbedding(config.vocab_size, config.hidden_size, quant_config, f"{prefix}.embed_tokens",
                                   dtype), also_on_last=bool(getattr(config, "tie_word_embeddings", True)))
        # transformers multiplies by the normalizer rounded to the activations' dtype (sqrt(3072) is 55.5 in bf16).
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5, dtype=dtype), persistent=False)
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scale = head_size ** -0.5 if version == 1 else config.query_pre_attn_scalar ** -0.5
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        # Gemma 3 keeps one rotary table per layer type (local layers have their own base); the others one.
        kinds = sorted(set(layer_types)) if version == 3 else [None]
        self.rotaries = nn.ModuleList(RotaryEmbedding(config, head_size, max_positions, dtype, kind) for kind in kinds)
        self.layers = nn.ModuleList()
        self.rope_index: list[int] = []
        self.start_layer, self.end_layer = stage_layer_range(config.num_hidden_layers)
        for i in range(config.num_hidden_layers):
            which = kinds.index(layer_types[i]) if version == 3 else 0
            self.rope_index.append(which)
            if not self.start_layer <= i < self.end_layer:  # another pipeline stage's layer
                self.layers.append(PPMissingLayer())
                continue
            attention = GemmaAttention(config, quant_config, f"{prefix}.layers.{i}.self_attn", dtype, backend,
                                       attn_config, self.rotaries[which], layer_windows[i], scale,
                                       qk_norm=version == 3)
            self.layers.append(GemmaDecoderLayer(config, quant_config, f"{prefix}.layers.{i}", dtype, attention,
                                                 sandwich_norms=version > 1))
        self.norm = last_stage_module(lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype,
                                                      unit_offset=True))
        self.is_first_stage, self.is_last_stage = is_first_stage(), is_last_stage()
        self.stage_rope_index = self.rope_index[self.start_layer:self.end_layer]
        self.attn_backend = backend.name
        # A platform's fused decode step (Platform.fused_decode), set by the runner once the KV caches exist.
        self.fused_decode = None

    def decoder_stack(self) -> DecoderStack | None:
        """The layer stack as the ops' handles, for a platform to fuse (the ``"gemma"`` recipe)."""
        if any(type(layer) is not GemmaDecoderLayer for layer in self.layers):
            return None  # layers on other pipeline stages
        layers, lora_step, epsilons = [], None, set()
        for layer, table in zip(self.layers, self.rope_index):
            attn = layer.self_attn
            kernels = llama_layer_kernels(layer, lora_step)
            if kernels is None:
                return None
            linears, lora, lora_step = kernels
            sandwich = layer.sandwich_norms
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            extra = [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm] if sandwich else [None, None]
            extra += [attn.q_norm, attn.k_norm]
            epsilons |= {n.eps for n in norms + extra if n is not None}
            layers.append(DecoderLayerSpec(
                *(n.weight for n in norms), *linears, attn.attn.impl.sliding_window,
                lora if lora_step is not None else None, None, None,
                *(None if n is None else n.weight for n in extra), rope_table=table))
        rotary_dims = {rotary.rotary_dim for rotary in self.rotaries}
        if len(epsilons) != 1 or len(rotary_dims) != 1:
            return None
        first = self.layers[0]
        attn = first.self_attn
        rotaries = list(self.rotaries)

        def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tables = [rotary.lookup(positions) for rotary in rotaries]
            return torch.stack([cos for cos, _ in tables]), torch.stack([sin for _, sin in tables])

        return DecoderStack("gemma", layers, self.norm.weight.shape[0], attn.num_heads, attn.num_kv_heads,
                            attn.head_size, first.mlp.gate_up_proj.output_sizes[0], rotary_dims.pop(),
                            epsilons.pop(), attn.attn.impl.scale, first.mlp.act.act, self.attn_backend, rope,
                            current_ops(), get_tp_group().world_size, lora_step,
                            getattr(attn.attn.impl, "logits_soft_cap", None))

    def forward(self, input_ids, positions, kv_caches, metadata, intermediate_tensors=None):
        if self.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids) * self.normalizer, None
            fused = self.fused_decode  # never set with pipeline parallelism (the runner declines it)
            if fused is not None and fused.applies(metadata, hidden.shape[0]):
                hidden, residual = fused.run(hidden, positions, metadata)
                hidden, _ = self.norm(hidden, residual)
                return hidden
        else:
            hidden, residual = stage_inputs(intermediate_tensors)
        ropes = [rotary.lookup(positions) for rotary in self.rotaries]
        stage_layers = islice(self.layers, self.start_layer, self.end_layer)
        for layer, which, kv_cache in zip(stage_layers, self.stage_rope_index, kv_caches):
            hidden, residual = layer(ropes[which], hidden, residual, kv_cache, metadata)
        if not self.is_last_stage:
            return stage_outputs(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(CausalLM):
    """Gemma 1; subclasses set ``version`` (2, 3) for the later generations' layers."""

    version = 1
    supports_pp = True
    stacked_params = LlamaForCausalLM.stacked_params
    # Hugging Face names map onto ours exactly as Llama's do (merged qkv_proj / gate_up_proj, tied head).
    load_weights = LlamaForCausalLM.load_weights
    map_weight_name = LlamaForCausalLM.map_weight_name

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        super().__init__()
        config = model_config.text_config
        self.check_config(config)
        dtype = model_config.dtype
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        windows = list(model_config.layer_sliding_windows or
                       [model_config.sliding_window] * config.num_hidden_layers)
        self.model = GemmaModel(config, quant_config, dtype, attn_backend, attn_config, model_config.max_model_len,
                                windows, self.version)
        self.init_lm_head(self.model.embed_tokens, config.hidden_size, quant_config, dtype)
        self.final_logit_soft_cap = getattr(config, "final_logit_softcapping", None)

    def check_config(self, config: Any) -> None:
        """Config features this implementation does not compute are errors, never silently dropped."""
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{type(self).__name__}: use_bidirectional_attention=True (bidirectional embedding "
                             "variants) is not supported; supported: causal attention")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        """Hidden states ``[num_tokens, hidden_size]`` after the final norm (a non-last pipeline stage: its
        IntermediateTensors)."""
        return self.model(input_ids, positions, kv_caches, metadata, intermediate_tensors)

    def decoder_stack(self) -> DecoderStack | None:
        return self.model.decoder_stack()

    def use_fused_decode(self, step) -> None:
        self.model.fused_decode = step

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, hidden_size] → float32 logits [n, vocab_size], soft-capped where the config says."""
        logits = super().compute_logits(hidden)
        cap = self.final_logit_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # compute_greedy stays the LM head's argmax: tanh is increasing, so soft-capping keeps it (short of float32
    # saturating two logits to one).


class Gemma2ForCausalLM(GemmaForCausalLM):
    version = 2


class Gemma3ForCausalLM(GemmaForCausalLM):
    version = 3

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            # transformers' Gemma 3 reads the field but never applies it, so no reference says what it would do.
            raise ValueError("Gemma3ForCausalLM: attn_logit_softcapping is set, which transformers' Gemma 3 does "
                             "not apply; supported: attn_logit_softcapping=None (every released Gemma 3)")


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """A multimodal Gemma 3 checkpoint (gemma-3-4b and larger) run as its text model: text prompts only. Its
    language model's weights load under their names in the checkpoint (``language_model.model.*``, or
    ``model.language_model.*`` as newer transformers save them); the vision tower and projector are skipped."""

    TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."))
    VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        def text_weights():
            for name, tensor in weights:
                if name.startswith(self.VISION_PREFIXES):
                    continue
                for old, new in self.TEXT_PREFIXES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                yield name, tensor

        return Gemma3ForCausalLM.load_weights(self, text_weights())


@hookimpl
def pagoda_register_models():
    return {
        "GemmaForCausalLM": GemmaForCausalLM,
        "Gemma2ForCausalLM": Gemma2ForCausalLM,
        "Gemma3ForCausalLM": Gemma3ForCausalLM,
        "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    }
