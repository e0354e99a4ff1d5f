"""The GPT-2 family (``GPT2LMHeadModel``: gpt2, gpt2-medium/large/xl, distilgpt2 and their fine-tunes).
Registered as a built-in plugin.

Pre-norm layers with LayerNorm (biases), multi-head attention on one fused ``c_attn`` projection, a GELU MLP
(``activation_function``, ``gelu_new`` — the tanh approximation — by default), learned position embeddings
(``wpe``) and a final ``ln_f``; the LM head is tied to the token embeddings unless the config says otherwise.

The checkpoints' projections are ``Conv1D`` modules, whose dense weights are stored transposed (``[in, out]``);
they are transposed once while loading. Tensor names come with ``transformer.`` (``GPT2LMHeadModel``) or without
it (the original ``gpt2`` files, saved from the bare model); the causal-mask buffers some files carry
(``attn.bias``, ``attn.masked_bias``) are not weights and are skipped.
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
from pagoda.models.layers import Attention, CausalLM, Linear, VocabEmbedding, load_param
from pagoda.plugins.hookspecs import hookimpl
from pagoda.quantization.interface import QuantizationConfig

#: Config switches that change GPT-2's maths in ways this implementation does not follow, with what it does.
UNSUPPORTED_FEATURES = {
    "add_cross_attention": "cross-attention blocks (an encoder-decoder setup)",
    "scale_attn_by_inverse_layer_idx": "attention scores divided by the layer index + 1",
    "reorder_and_upcast_attn": "attention scores computed in float32 with the scale applied to the keys",
}
#: Conv1D layers, whose dense ``weight`` is stored ``[in, out]``.
CONV1D_LAYERS = (".c_attn.", ".c_proj.", ".c_fc.")
#: Checkpoint tensors that are not weights: the causal-mask buffers of older files.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def check_config(config: Any) -> None:
    """An error naming each config feature set that this implementation does not support."""
    used = [name for name in UNSUPPORTED_FEATURES if getattr(config, name, False)]
    if not getattr(config, "scale_attn_weights", True):
        used.append("scale_attn_weights=False")
    if used:
        raise ValueError(f"GPT-2 config feature(s) {', '.join(used)} are not supported; supported: GPT-2 with "
                         "scale_attn_weights=True and none of " + ", ".join(
                             f"{name} ({what})" for name, what in UNSUPPORTED_FEATURES.items()))


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.head_size = hidden // config.num_attention_heads
        self.num_heads = heads_per_rank(config.num_attention_heads, config.num_attention_heads,
                                        get_tp_group().world_size)[0]
        # c_attn is stored fused [q; k; v]: the loader splits it per shard (narrow with shard=None)
        self.c_attn = Linear(hidden, [hidden] * 3, True, quant_config, f"{prefix}.c_attn", dtype, parallel="column",
                             output_units=[self.head_size] * 3)
        self.c_proj = Linear(hidden, [hidden], True, quant_config, f"{prefix}.c_proj", dtype, parallel="row")
        self.attn = Attention(self.num_heads, self.head_size, self.num_heads, backend, attn_config)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor | None, metadata: Any) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)
        shape = (-1, self.num_heads, self.head_size)
        return self.c_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), kv_cache, metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.c_fc = Linear(hidden, [inner], True, quant_config, f"{prefix}.c_fc", dtype, parallel="column")
        self.act = Activation(getattr(config, "activation_function", "gelu_new"))
        self.c_proj = Linear(inner, [hidden], True, quant_config, f"{prefix}.c_proj", dtype, parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hidden, eps, dtype)
        self.attn = GPT2Attention(config, quant_config, f"{prefix}.attn", dtype, backend, attn_config)
        self.ln_2 = LayerNorm(hidden, eps, dtype)
        self.mlp = GPT2MLP(config, quant_config, f"{prefix}.mlp", dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor | None,
                metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` is the last block's output, not yet added to the ``residual`` stream (the next norm adds it,
        fused); returns the same pair."""
        if residual is None:
            residual, hidden = hidden, self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden, residual = self.ln_2(self.attn(hidden, kv_cache, metadata), residual)
        return self.mlp(hidden), residual


class GPT2Model(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        # Pipeline stages: the embeddings on the first (wte also on the last when the LM head is tied to it),
        # ln_f on the last.
        self.wte = first_stage_module(
            lambda: VocabEmbedding(config.vocab_size, hidden, quant_config, f"{prefix}.wte", dtype),
            also_on_last=bool(getattr(config, "tie_word_embeddings", True)))
        self.wpe = first_stage_module(  # small: whole on every tensor-parallel rank
            lambda: VocabEmbedding(config.max_position_embeddings, hidden, quant_config, f"{prefix}.wpe", dtype,
                                   vocab_parallel=False))
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda i: GPT2Block(config, quant_config, f"{prefix}.h.{i}", dtype, backend, attn_config))
        self.ln_f = last_stage_module(lambda: LayerNorm(hidden, config.layer_norm_epsilon, dtype))
        self.is_first_stage, self.is_last_stage = is_first_stage(), is_last_stage()
        self.hidden_size, self.attn_backend = hidden, backend.name
        # A platform's fused decode step (Platform.fused_decode), set by the runner once the KV caches exist.
        self.fused_decode = None

    def decoder_stack(self) -> DecoderStack | None:
        """The layer stack for a platform to fuse."""
        if any(type(block) is not GPT2Block for block in self.h):
            return None  # blocks on other pipeline stages
        return gpt_decoder_stack([
            GptLayerParts(block.ln_1, block.attn.c_attn, block.attn.c_proj, block.attn.attn, block.ln_2,
                          block.mlp.c_fc, block.mlp.act, block.mlp.c_proj) for block in self.h],
            self.hidden_size, self.attn_backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        if self.is_first_stage:
            hidden, residual = self.wte(input_ids) + self.wpe(positions), None
            fused = self.fused_decode  # never set with pipeline parallelism (the runner declines it)
            if fused is not None and fused.applies(metadata, hidden.shape[0]):
                hidden, residual = fused.run(hidden, positions, metadata)
                return self.ln_f(hidden, residual)[0]
        else:
            hidden, residual = stage_inputs(intermediate_tensors)
        for block, kv_cache in zip(islice(self.h, self.start_layer, self.end_layer), kv_caches):
            hidden, residual = block(hidden, residual, kv_cache, metadata)
        if not self.is_last_stage:
            return stage_outputs(hidden, residual)
        return self.ln_f(hidden, residual)[0]


class GPT2LMHeadModel(CausalLM):
    supports_pp = True

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        super().__init__()
        config = model_config.text_config
        check_config(config)
        dtype = model_config.dtype
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.transformer = GPT2Model(config, quant_config, dtype, attn_backend, attn_config, "transformer")
        self.init_lm_head(self.transformer.wte, config.hidden_size, quant_config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, intermediate_tensors: Any = None) -> Any:
        """Hidden states ``[num_tokens, hidden_size]`` after ``ln_f`` (a non-last pipeline stage: its
        IntermediateTensors)."""
        return self.transformer(input_ids, positions, kv_caches, metadata, intermediate_tensors)

    def decoder_stack(self) -> DecoderStack | None:
        return self.transformer.decoder_stack()

    def use_fused_decode(self, step) -> None:
        self.transformer.fused_decode = step

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load checkpoint tensors by Hugging Face name (``transformer.*`` or bare, ``lm_head.*``), transposing the
        Conv1D weights; returns the names of the parameters that were loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        elsewhere = missing_prefixes(self)  # modules of other pipeline stages
        for name, tensor in weights:
            if name.endswith(MASK_BUFFERS):
                continue
            if name == "lm_head.weight":
                if self.tie_word_embeddings:
                    continue  # the same table as the token embeddings
            elif not name.startswith("transformer."):
                name = "transformer." + name  # checkpoints saved from the bare model
            if elsewhere and name.startswith(elsewhere):
                continue
            # Conv1D stores [in, out]; a quantized checkpoint's weight record (GGUF) is already [out, in]
            if (any(layer in name for layer in CONV1D_LAYERS) and name.endswith(".weight")
                    and isinstance(tensor, torch.Tensor) and tensor.dim() == 2):
                tensor = tensor.t()
            loaded.add(load_param(self, params, name, tensor))
        return loaded


@hookimpl
def pagoda_register_models():
    return {"GPT2LMHeadModel": GPT2LMHeadModel}
