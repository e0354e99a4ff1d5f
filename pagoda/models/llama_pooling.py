"""Pooling models on the Llama-family decoder (llama.py): embedders (``LlamaModel``, ``MistralModel`` — e.g.
e5-mistral —, ``Qwen2Model``) with last-token pooling and normalization, and sequence classifiers
(``LlamaForSequenceClassification``, ``MistralForSequenceClassification``, ``Qwen2ForSequenceClassification``)
whose ``score`` projection reads the last token.

They reuse the decoder, its projection-bias flags and its weight loader; only the LM head is replaced by a
pooler. Attention stays causal and uses the KV cache like generation does (a pooling request runs its whole
prompt in one step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.models.layers import Linear
from pagoda.models.llama import LlamaForCausalLM, LlamaModel, Qwen2ForCausalLM
from pagoda.models.pooler import ClassifierPooler, EmbeddingPooler, resolve_pooler_config
from pagoda.quantization.interface import QuantizationConfig
from pagoda.quantization.unquantized import default_weight_loader


class LlamaEmbeddingModel(LlamaForCausalLM):
    """Decoder embedder: the last token's final hidden state, normalized (vLLM's defaults), unless the model's
    sentence-transformers config or ``override_pooler_config`` says otherwise."""

    supported_tasks: tuple[str, ...] = ("embed",)
    head_prefix = "score."  # checkpoint names of the head (classifiers)

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        nn.Module.__init__(self)  # the decoder without its LM head
        config = model_config.text_config
        self.config = config
        self.tie_word_embeddings = True  # makes the inherited loader skip a checkpoint's lm_head.weight
        self.model = LlamaModel(config, quant_config, model_config.dtype, attn_backend, attn_config,
                                self.arch_flags(config), model_config.max_model_len, model_config.sliding_window)
        self.pooler = self.build_pooler(model_config, quant_config)

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        pooling = resolve_pooler_config(model_config, pooling_type="LAST", normalize=True)
        return EmbeddingPooler(pooling, self.config.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is a pooling model: it has no LM head to generate with")

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """The decoder's weights through the Llama loader; head tensors (``score.*``) into the pooler's head."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def decoder_weights():
            for name, tensor in weights:
                if name.startswith(self.head_prefix):
                    target = "pooler.head." + name.removeprefix(self.head_prefix)
                    param = params.get(target)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in "
                                         f"{type(self).__name__}")
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(target)
                else:
                    yield name, tensor

        return loaded | super().load_weights(decoder_weights())


class Qwen2EmbeddingModel(LlamaEmbeddingModel):
    arch_flags = Qwen2ForCausalLM.arch_flags


class LlamaForSequenceClassification(LlamaEmbeddingModel):
    """Decoder classifier: ``score`` (no bias) on the last token; softmax over the labels, sigmoid for one."""

    supported_tasks = ("classify", "score")

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        config = self.config
        pooling = resolve_pooler_config(model_config, pooling_type="LAST")
        head = Linear(config.hidden_size, [config.num_labels], False, quant_config, "score", model_config.dtype)
        return ClassifierPooler(pooling, head, config.num_labels)


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    arch_flags = Qwen2ForCausalLM.arch_flags


#: architecture name → class (registered by the pooling-models plugin in pooler.py)
MODELS = {
    "LlamaModel": LlamaEmbeddingModel,
    "MistralModel": LlamaEmbeddingModel,
    "Qwen2Model": Qwen2EmbeddingModel,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
}
