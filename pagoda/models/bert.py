"""BERT encoders for embeddings (``BertModel``) and cross-encoding / classification
(``BertForSequenceClassification``). Registered as a built-in plugin together with XLM-RoBERTa (roberta.py).

Encoders attend bidirectionally within each prompt and keep no KV cache: the engine gives them
``kv_caches = [None] * layers`` and non-causal attention metadata, and runs each prompt whole in one step.
Weights go through ``Linear`` / ``VocabEmbedding`` so quantization methods apply; LayerNorm and GELU are plain
torch. Checkpoints load from the bare model (``embeddings.*``, ``encoder.*``) or from a task model
(``bert.embeddings.*`` … plus its head).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.models.interface import PagodaModel
from pagoda.models.layers import Attention, Linear, VocabEmbedding, load_param
from pagoda.models.pooler import ClassifierPooler, EmbeddingPooler, resolve_pooler_config
from pagoda.quantization.interface import QuantizationConfig
from pagoda.quantization.unquantized import default_weight_loader


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# checkpoint tensors that no pooling model here uses (position-id buffers, masked-LM heads)
_UNUSED = ("embeddings.position_ids", "cls.", "lm_head.")


def layer_norm(size: int, eps: float, dtype: torch.dtype) -> nn.LayerNorm:
    norm = nn.LayerNorm(size, eps=eps, dtype=dtype)
    for param in norm.parameters():
        param.requires_grad_(False)
        param.weight_loader = default_weight_loader
    return norm


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 position_offset: int) -> None:
        super().__init__()
        kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ValueError(f"position_embedding_type {kind!r} is not supported (only absolute)")
        hidden = config.hidden_size
        self.word_embeddings = VocabEmbedding(config.vocab_size, hidden, quant_config, f"{prefix}.word_embeddings",
                                              dtype)
        self.position_embeddings = VocabEmbedding(config.max_position_embeddings, hidden, quant_config,
                                                  f"{prefix}.position_embeddings", dtype)
        self.token_type_embeddings = VocabEmbedding(config.type_vocab_size, hidden, quant_config,
                                                    f"{prefix}.token_type_embeddings", dtype)
        self.LayerNorm = layer_norm(hidden, config.layer_norm_eps, dtype)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_size = hidden // self.num_heads
        self.qkv_proj = Linear(hidden, [hidden] * 3, True, quant_config, f"{prefix}.qkv_proj", dtype)
        self.attn = Attention(self.num_heads, self.head_size, self.num_heads, backend, attn_config)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor | None, metadata: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        shape = (-1, self.num_heads, self.head_size)
        return self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape), kv_cache, metadata)


class DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's attention output and layer output."""

    def __init__(self, in_size: int, out_size: int, eps: float, quant_config: QuantizationConfig, prefix: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = Linear(in_size, [out_size], True, quant_config, f"{prefix}.dense", dtype)
        self.LayerNorm = layer_norm(out_size, eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig, prefix: str, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig) -> None:
        super().__init__()
        hidden, inter, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(config, quant_config, f"{prefix}.attention.self", dtype, backend,
                                                attn_config)
        self.attention.output = DenseNorm(hidden, hidden, eps, quant_config, f"{prefix}.attention.output", dtype)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(hidden, [inter], True, quant_config, f"{prefix}.intermediate.dense", dtype)
        self.output = DenseNorm(inter, hidden, eps, quant_config, f"{prefix}.output", dtype)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor | None, metadata: Any) -> torch.Tensor:
        hidden = self.attention.output(self.attention.self(hidden, kv_cache, metadata), hidden)
        return self.output(self.act(self.intermediate.dense(hidden)), hidden)


class BertEncoder(nn.Module):
    """Embeddings and the transformer layers: ``[num_tokens]`` ids → ``[num_tokens, hidden]`` states."""

    def __init__(self, config: Any, quant_config: QuantizationConfig, dtype: torch.dtype,
                 backend: type[AttentionBackend], attn_config: AttentionConfig, prefix: str,
                 position_offset: int = 0) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config, quant_config, f"{prefix}.embeddings", dtype, position_offset)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(config, quant_config, f"{prefix}.encoder.layer.{i}", dtype, backend, attn_config)
            for i in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, metadata, token_type_ids=None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        for layer, kv_cache in zip(self.encoder.layer, kv_caches):
            hidden = layer(hidden, kv_cache, metadata)
        return hidden


class TanhClassificationHead(nn.Module):
    """``out_proj(tanh(dense(x)))`` on the pooled (CLS) state: BERT's pooler + classifier, and RoBERTa's
    classification head."""

    def __init__(self, hidden: int, num_labels: int, quant_config: QuantizationConfig, dense_prefix: str,
                 out_prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = Linear(hidden, [hidden], True, quant_config, dense_prefix, dtype)
        self.out_proj = Linear(hidden, [num_labels], True, quant_config, out_prefix, dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(pooled)))


class BertEmbeddingModel(PagodaModel):
    """``BertModel`` as an embedding model: CLS pooling + normalization unless its sentence-transformers
    config says otherwise (vLLM's defaults)."""

    supported_tasks: tuple[str, ...] = ("embed",)
    is_encoder_only = True
    uses_token_type_ids = True
    checkpoint_prefixes = ("bert.", "model.")
    position_offset = 0

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, attn_backend: type[AttentionBackend],
                 attn_config: AttentionConfig) -> None:
        super().__init__()
        config = model_config.hf_config
        self.config = config
        offset = self.get_position_offset(config)
        self.model = BertEncoder(config, quant_config, model_config.dtype, attn_backend, attn_config,
                                 self.checkpoint_prefixes[0].rstrip("."), offset)
        self.pooler = self.build_pooler(model_config, quant_config)

    @classmethod
    def get_position_offset(cls, config: Any) -> int:
        return cls.position_offset

    @classmethod
    def max_model_len_limit(cls, config: Any) -> int:
        """Positions the model can take (the engine caps ``max_model_len`` at it): RoBERTa-style position ids
        start after the padding index, so fewer than ``max_position_embeddings`` are usable."""
        return config.max_position_embeddings - cls.get_position_offset(config)

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        pooling = resolve_pooler_config(model_config, pooling_type="CLS", normalize=True)
        return EmbeddingPooler(pooling, self.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor | None],
                metadata: Any, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden_size]`` of the last layer."""
        return self.model(input_ids, positions, kv_caches, metadata, token_type_ids)

    def map_head_name(self, name: str) -> str | None:
        """Our parameter name for a head tensor (without the encoder prefix); None: not used by this model."""
        return None if name.startswith("pooler.") else name

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load checkpoint tensors by Hugging Face name; returns the names of the parameters that were loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for prefix in self.checkpoint_prefixes:
                name = name.removeprefix(prefix)
            if name.startswith(_UNUSED):
                continue
            if name.startswith(("embeddings.", "encoder.")):
                name = "model." + name
            else:
                name = self.map_head_name(name)
                if name is None:
                    continue
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            shard = None
            for shard_id, original in enumerate(("query", "key", "value")):
                if f".attention.self.{original}." in name:
                    name, shard = name.replace(f".self.{original}.", ".self.qkv_proj."), shard_id
            loaded.add(load_param(self, params, name, tensor, shard))
        return loaded


def cross_encoder_activation(config: Any) -> bool:
    """Whether scores go through the sigmoid/softmax: sentence-transformers cross-encoders may say Identity."""
    name = getattr(config, "sbert_ce_default_activation_function", None) or ""
    return not name.endswith("Identity")


class BertForSequenceClassification(BertEmbeddingModel):
    """BERT cross-encoder / classifier: the BERT pooler (dense + tanh on CLS) then the classifier; sigmoid for
    one label (a relevance score), softmax otherwise."""

    supported_tasks = ("score", "classify")

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        config = self.config
        pooling = resolve_pooler_config(model_config, pooling_type="CLS",
                                        activation=cross_encoder_activation(config))
        head = TanhClassificationHead(config.hidden_size, config.num_labels, quant_config, "bert.pooler.dense",
                                      "classifier", model_config.dtype)
        return ClassifierPooler(pooling, head, config.num_labels)

    def map_head_name(self, name: str) -> str | None:
        if name.startswith("pooler.dense."):
            return "pooler.head.dense." + name.removeprefix("pooler.dense.")
        if name.startswith("classifier."):
            return "pooler.head.out_proj." + name.removeprefix("classifier.")
        return name


#: architecture name → class (registered by the pooling-models plugin in pooler.py)
MODELS = {"BertModel": BertEmbeddingModel, "BertForSequenceClassification": BertForSequenceClassification}
