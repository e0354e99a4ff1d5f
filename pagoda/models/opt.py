"""The OPT family (``OPTForCausalLM``: facebook/opt-125m … 66b). Registered as a built-in plugin.

What sets OPT apart from the Llama family: learned position embeddings whose table starts 2 rows in (a relic of
fairseq's padding index), LayerNorm with biases, a plain ReLU MLP (``activation_function``), multi-head
attention with biased projections (``enable_bias``) and no rotary embedding, and two layouts:

* ``do_layer_norm_before=True`` (125m, 1.3b and larger): pre-norm layers and a final LayerNorm;
* ``do_layer_norm_before=False`` (350m): post-norm layers (the norm follows each residual add) and no final
  LayerNorm.

Where ``word_embed_proj_dim`` differs from ``hidden_size`` (350m), the embeddings live in the smaller width and
``project_in`` / ``project_out`` move between the two; the LM head (tied to the token embeddings unless the config
says otherwise) works in the embedding width. Checkpoints name tensors ``model.decoder.*`` or, saved from the bare
decoder, ``decoder.*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.distributed.parallel_state import get_tp_group
from pagoda.distributed.pipeline import (first_stage_module, is_first_stage, is_last_stage, last_stage_module,
                                         make_layers, missing_prefixes, stage_inputs, stage_outputs)
from pagoda.distributed.tensor_parallel import heads_per_rank
from pagoda.models.gpt_layers import Activation, GptLayerParts, LayerNorm, gpt_decoder_stack
from pagoda.models.interface import DecoderStack
from pagoda.models.layers import Attention, CausalLM, Linear, VocabEmbedding, load_param, merged_param_name
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import QuantizationConfig

#: OPT's position embedding table is indexed by position + 2.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which OPT's layers use


class OPTAttention(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, bool(getattr(config, "enable_bias", True))
        self.head_size = hidden // config.num_attention_heads
        self.num_heads = heads_per_rank(config.num_attention_heads, config.num_attention_heads,
                                        get_tp_group().world_size)[0]
        self.qkv_proj = Linear(hidden, [hidden] * 3, bias, quant_config, f"{prefix}.qkv_proj", dtype,
                               parallel="column", output_units=[self.head_size] * 3)
        self.out_proj = Linear(hidden, [hidden], bias, quant_config, f"{prefix}.out_proj", dtype, parallel="row")
        self.attn = Attention(self.num_heads, self.head_size, self.num_heads, backend, attn_config)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor | None, metadata: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        shape = (-1, self.num_heads, self.head_size)
        return self.out_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), kv_cache, metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, bool(getattr(config, "enable_bias", True))
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config, quant_config, f"{prefix}.self_attn", dtype, backend, attn_config)
        self.self_attn_layer_norm = LayerNorm(hidden, LAYER_NORM_EPS, dtype, affine)
        self.fc1 = Linear(hidden, [config.ffn_dim], bias, quant_config, f"{prefix}.fc1", dtype, parallel="column")
        self.activation = Activation(getattr(config, "activation_function", "relu"))
        self.fc2 = Linear(config.ffn_dim, [hidden], bias, quant_config, f"{prefix}.fc2", dtype, parallel="row")
        self.final_layer_norm = LayerNorm(hidden, LAYER_NORM_EPS, dtype, affine)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor | None,
                metadata: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-norm: ``hidden`` is the last block's output, not yet added to the ``residual`` stream (the next norm
        adds it, fused); returns the same pair. Post-norm: ``hidden`` is the stream itself and ``residual`` None."""
        if self.pre_norm:
            if residual is None:
                residual, hidden = hidden, self.self_attn_layer_norm(hidden)
            else:
                hidden, residual = self.self_attn_layer_norm(hidden, residual)
            hidden = self.self_attn(hidden, kv_cache, metadata)
            hidden, residual = self.final_layer_norm(hidden, residual)
            return self.mlp(hidden), residual
        hidden, _ = self.self_attn_layer_norm(self.self_attn(hidden, kv_cache, metadata), hidden)
        hidden, _ = self.final_layer_norm(self.mlp(hidden), hidden)
        return hidden, None


class OPTDecoder(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, prefix: str) -> None:
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        # Pipeline stages: the embeddings and project_in on the first (the token table also on the last when the
        # LM head is tied to it), the final norm and project_out on the last.
        first, last = is_first_stage(), is_last_stage()
        self.embed_tokens = first_stage_module(
            lambda: VocabEmbedding(config.vocab_size, embed_dim, quant_config, f"{prefix}.embed_tokens", dtype),
            also_on_last=bool(getattr(config, "tie_word_embeddings", True)))
        self.embed_positions = first_stage_module(  # small: whole on every tensor-parallel rank
            lambda: VocabEmbedding(config.max_position_embeddings + POSITION_OFFSET, hidden, quant_config,
                                   f"{prefix}.embed_positions", dtype, vocab_parallel=False))
        self.project_in = self.project_out = None
        if embed_dim != hidden:
            self.project_in = first_stage_module(
                lambda: Linear(embed_dim, [hidden], False, quant_config, f"{prefix}.project_in", dtype))
            self.project_out = last_stage_module(
                lambda: Linear(hidden, [embed_dim], False, quant_config, f"{prefix}.project_out", dtype))
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda i: OPTDecoderLayer(config, quant_config, f"{prefix}.layers.{i}", dtype, backend, attn_config))
        # Only pre-norm OPT has a final norm; _remove_final_layer_norm marks checkpoints fine-tuned without it.
        self.final_layer_norm = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = last_stage_module(
                lambda: LayerNorm(hidden, LAYER_NORM_EPS, dtype,
                                  bool(getattr(config, "layer_norm_elementwise_affine", True))))
        self.is_first_stage, self.is_last_stage = first, last
        self.hidden_size, self.attn_backend = hidden, backend.name
        # A platform's fused decode step (Platform.fused_decode), set by the runner once the KV caches exist.
        self.fused_decode = None

    def decoder_stack(self) -> DecoderStack | None:
        """The pre-norm layer stack for a platform to fuse (post-norm OPT has none)."""
        if any(type(layer) is not OPTDecoderLayer or not layer.pre_norm for layer in self.layers):
            return None  # post-norm layers, or layers on other pipeline stages
        return gpt_decoder_stack([
            GptLayerParts(layer.self_attn_layer_norm, layer.self_attn.qkv_proj, layer.self_attn.out_proj,
                          layer.self_attn.attn, layer.final_layer_norm, layer.fc1, layer.activation, layer.fc2)
            for layer in self.layers], self.hidden_size, self.attn_backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        if self.is_first_stage:
            embeds = self.embed_tokens(input_ids)
            if self.project_in is not None:
                embeds = self.project_in(embeds)
            hidden, residual = embeds + self.embed_positions(positions + POSITION_OFFSET), None
            fused = self.fused_decode  # never set with pipeline parallelism (the runner declines it)
            if fused is not None and fused.applies(metadata, hidden.shape[0]):
                hidden, residual = fused.run(hidden, positions, metadata)
                return self._output(hidden, residual)
        else:
            hidden, residual = stage_inputs(intermediate_tensors)
        for layer, kv_cache in zip(islice(self.layers, self.start_layer, self.end_layer), kv_caches):
            hidden, residual = layer(hidden, residual, kv_cache, metadata)
        if not self.is_last_stage:
            return stage_outputs(hidden, residual)
        return self._output(hidden, residual)

    def _output(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output (and the residual stream, pre-norm) → what the LM head reads."""
        if residual is not None:  # pre-norm: the last block's output still has to join the stream
            hidden = (self.final_layer_norm(hidden, residual)[0] if self.final_layer_norm is not None
                      else hidden + residual)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTForCausalLM(CausalLM):
    supports_pp = True
    # checkpoint projection → (our merged projection, shard index)
    stacked_params = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2))

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        super().__init__()
        config = model_config.text_config
        dtype = model_config.dtype
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.decoder = OPTDecoder(config, quant_config, dtype, attn_backend, attn_config, "model.decoder")
        self.init_lm_head(self.decoder.embed_tokens, config.word_embed_proj_dim, quant_config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        """Hidden states ``[num_tokens, word_embed_proj_dim]``: what the LM head reads (a non-last pipeline stage:
        its IntermediateTensors)."""
        return self.decoder(input_ids, positions, kv_caches, metadata, intermediate_tensors)

    def decoder_stack(self) -> DecoderStack | None:
        return self.decoder.decoder_stack()

    def use_fused_decode(self, step) -> None:
        self.decoder.fused_decode = step

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load checkpoint tensors by Hugging Face name (``model.decoder.*`` or ``decoder.*``, ``lm_head.*``);
        returns the names of the parameters that were loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        elsewhere = missing_prefixes(self)  # modules of other pipeline stages
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # the same table as the token embeddings
            name, shard = merged_param_name(name, self.stacked_params)
            if elsewhere and name.startswith(elsewhere):
                continue
            loaded.add(load_param(self, params, name, tensor, shard))
        return loaded


@hookimpl
def pagoda_register_models():
    return {"OPTForCausalLM": OPTForCausalLM}
