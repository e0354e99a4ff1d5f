"""XLM-RoBERTa (and RoBERTa) encoders: ``XLMRobertaModel`` for embeddings and
``XLMRobertaForSequenceClassification`` — the bge-reranker architecture — for cross-encoder scores.

The encoder is BERT's (bert.py) with two differences: position ids start at ``padding_idx + 1`` (so a model
with 514 position embeddings takes 512 tokens), and the classification head is ``dense → tanh → out_proj`` on
the CLS token without BERT's pooler.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagoda.models.bert import BertEmbeddingModel, TanhClassificationHead, cross_encoder_activation
from pagoda.models.pooler import ClassifierPooler, resolve_pooler_config
from pagoda.quantization.interface import QuantizationConfig


class XLMRobertaModel(BertEmbeddingModel):
    """Embedding model: CLS pooling + normalization unless its sentence-transformers config says otherwise."""

    uses_token_type_ids = False  # a single token type: the embedding of type 0 is added to every token
    checkpoint_prefixes = ("roberta.", "model.")

    @classmethod
    def get_position_offset(cls, config: Any) -> int:
        pad = getattr(config, "pad_token_id", None)
        return (1 if pad is None else int(pad)) + 1


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    """Cross-encoder / classifier: sigmoid of the single label for a relevance score, softmax otherwise."""

    supported_tasks = ("score", "classify")

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        config = self.config
        pooling = resolve_pooler_config(model_config, pooling_type="CLS",
                                        activation=cross_encoder_activation(config))
        head = TanhClassificationHead(config.hidden_size, config.num_labels, quant_config, "classifier.dense",
                                      "classifier.out_proj", model_config.dtype)
        return ClassifierPooler(pooling, head, config.num_labels)

    def map_head_name(self, name: str) -> str | None:
        if name.startswith("classifier."):
            return "pooler.head." + name.removeprefix("classifier.")
        return None if name.startswith("pooler.") else name


#: architecture name → class (registered by the pooling-models plugin in pooler.py)
MODELS = {
    "XLMRobertaModel": XLMRobertaModel,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    "RobertaModel": XLMRobertaModel,
    "RobertaForSequenceClassification": XLMRobertaForSequenceClassification,
}
