"""Any causal LM as a pooling model: vLLM's conversion of a ``*ForCausalLM`` checkpoint when asked for
``task="embed"`` or ``task="classify"`` / ``"score"`` (vLLM ≥ 0.10: ``runner="pooling"``, ``convert=...``).

The conversion wraps the registered generative class, so every family gets it without code of its own. What a
family must provide (the Llama family, Phi-3 and the others do):

* ``forward`` returns the final hidden states (after the last norm), as the model interface says;
* its LM head is the submodule ``lm_head`` (possibly the embedding table itself, when tied) and loads from the
  checkpoint's ``lm_head.*`` tensors, while its ``load_weights`` accepts every other tensor of the checkpoint.

The converted model drops the LM head (and the checkpoint's ``lm_head.*``) and pools the last token:

* **embed** — the last token's hidden state, L2-normalized (vLLM's defaults for decoder embedders), unless the
  model's sentence-transformers files or ``override_pooler_config`` say otherwise;
* **classify / score** — a ``score`` projection (no bias) of the last token, then softmax over the labels (sigmoid
  for one). Its weight comes from, in this order: a ``score.weight`` tensor in the checkpoint (``num_labels`` rows,
  a ``*ForSequenceClassification`` checkpoint), or the LM head's rows of the tokens ``classifier_from_token`` in
  config.json names (ids or tokenizer tokens) with ``method``: ``from_2_way_softmax`` (two tokens ``[no, yes]``;
  one label scoring ``yes - no``, whose sigmoid is the LM's two-way softmax — Qwen3-Reranker, mxbai-rerank-v2;
  ``is_original_qwen3_reranker: true`` implies it) or ``no_post_processing`` (one label per token). Anything else
  is an error naming what is missing.

``FooForSequenceClassification`` checkpoints of a family that registers only ``FooForCausalLM`` load as that
family's converted classifier (vLLM registers the same conversion under those names).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagoda.models.interface import PagodaModel
from pagoda.models.layers import Linear
from pagoda.models.pooler import ClassifierPooler, EmbeddingPooler, resolve_pooler_config
from pagoda.quantization.interface import QuantizationConfig
from pagoda.quantization.unquantized import UnquantizedConfig, default_weight_loader

CONVERTED_TASKS = {"embed": "embed", "classify": "classify", "score": "classify"}
TOKEN_METHODS = ("from_2_way_softmax", "no_post_processing")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model_cls: type) -> bool:
    """A generative decoder the conversion applies to."""
    return "generate" in model_cls.supported_tasks and not model_cls.is_encoder_only


def model_class_for_task(registry: Any, architectures: list[str], task: str) -> type:
    """The class that runs ``architectures`` for ``task``: the registered class; its pooling conversion when it is
    a causal LM asked for a pooling task it lacks; for an unregistered ``FooForSequenceClassification``, the
    converted classifier of a registered ``FooForCausalLM``. The caller checks that the class supports ``task``."""
    try:
        model_cls = registry.get_model_class(architectures)
    except ValueError:
        model_cls = _classifier_from_causal_name(registry, architectures)
        if model_cls is None:
            raise
        return model_cls
    if task in model_cls.supported_tasks or task not in CONVERTED_TASKS or not is_causal_lm(model_cls):
        return model_cls
    return as_pooling_model(model_cls, CONVERTED_TASKS[task])


def _classifier_from_causal_name(registry: Any, architectures: list[str]) -> type | None:
    for arch in architectures:
        base = arch.removesuffix("ForSequenceClassification")
        if base == arch:
            continue
        for suffix in _CAUSAL_SUFFIXES:
            causal = registry.models.get(base + suffix)
            if causal is not None and is_causal_lm(causal):
                return as_pooling_model(causal, "classify")
    return None


@functools.cache
def as_pooling_model(model_cls: type, kind: str) -> type:
    """``model_cls`` (a causal LM) converted to an embedder (``kind="embed"``) or a classifier (``"classify"``);
    one class per pair, so configuration and loading see the same class."""
    base = model_cls.__name__
    for suffix in _CAUSAL_SUFFIXES:
        base = base.removesuffix(suffix)
    mixin = CausalEmbedding if kind == "embed" else CausalClassifier
    name = base + ("ForEmbedding" if kind == "embed" else "ForSequenceClassification")
    return type(name, (mixin, model_cls), {"__module__": __name__, "__doc__": mixin.__doc__})


class CausalEmbedding(PagodaModel):
    """A causal LM without its LM head, pooling the last token into a normalized embedding."""

    supported_tasks: tuple[str, ...] = ("embed",)
    needs_lm_head_rows = False  # whether the head is built from the LM head's rows of some tokens

    def __init__(self, *, model_config: Any, quant_config: QuantizationConfig, **kwargs: Any) -> None:
        super().__init__(model_config=model_config, quant_config=quant_config, **kwargs)
        head = self._modules.get("lm_head")
        if head is None:
            raise TypeError(f"{type(self).__name__}: the causal LM has no 'lm_head' submodule to replace by a pooler")
        del self.lm_head
        tied = any(module is head for module in self.modules())
        if tied:
            head.serves_logits = False  # the table now only serves lookups: no copy prepared for logits
        # Not a submodule: a tied table's rows for classifier tokens (read after loading), else nothing.
        self.__dict__["tied_head"] = head if tied else None
        self.model_config = model_config
        self.pooler = self.build_pooler(model_config, quant_config)

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        pooling = resolve_pooler_config(model_config, pooling_type="LAST", normalize=True)
        return EmbeddingPooler(pooling, model_config.text_config.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is a pooling model: it has no LM head to generate with")

    def compute_greedy(self, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        return None

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """The decoder's weights through the family's loader; the LM head's are dropped (kept aside for the
        classifier's token rows), a ``score`` head's go to the pooler."""
        head_tensors: dict[str, Any] = {}
        loaded: set[str] = set()

        def decoder_weights():
            for name, tensor in weights:
                if name.startswith("lm_head."):
                    if self.needs_lm_head_rows:  # else dropped right away (it can be the largest tensor)
                        head_tensors[name] = tensor
                elif name.startswith("score."):
                    loaded.add(self.load_score(name, tensor))
                else:
                    yield name, tensor

        loaded |= super().load_weights(decoder_weights())
        return loaded | self.finish_head(head_tensors.get("lm_head.weight"), loaded)

    def load_score(self, name: str, tensor: Any) -> str:
        raise ValueError(f"checkpoint tensor {name!r}: an embedding model has no score head; load it with "
                         "task='classify'")

    def finish_head(self, lm_head_weight: Any, loaded: set[str]) -> set[str]:
        return set()


class CausalClassifier(CausalEmbedding):
    """A causal LM without its LM head, classifying the last token through a ``score`` projection."""

    supported_tasks = ("classify", "score")

    def build_pooler(self, model_config: Any, quant_config: QuantizationConfig) -> nn.Module:
        config = model_config.text_config
        tokens, method = classifier_tokens(config)
        if method is None:
            num_labels = int(getattr(config, "num_labels", 0) or 0)
        else:
            num_labels = 1 if method == "from_2_way_softmax" else len(tokens)
            quant_config = UnquantizedConfig()  # made from the LM head's rows after loading: a dense weight
        self.classifier_from = (tokens, method)
        self.needs_lm_head_rows = method is not None
        pooling = resolve_pooler_config(model_config, pooling_type="LAST")
        head = Linear(config.hidden_size, [num_labels], False, quant_config, "score", model_config.dtype)
        return ClassifierPooler(pooling, head, num_labels)

    def load_score(self, name: str, tensor: Any) -> str:
        target = "pooler.head." + name.removeprefix("score.")
        param = dict(self.named_parameters()).get(target)
        if param is None or self.classifier_from[1] is not None:
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return target

    def finish_head(self, lm_head_weight: Any, loaded: set[str]) -> set[str]:
        tokens, method = self.classifier_from
        if method is None:
            if "pooler.head.weight" not in loaded:
                raise ValueError(
                    f"task classify on a causal LM ({type(self).__name__}) needs a classification head: a "
                    "score.weight tensor in the checkpoint (num_labels rows), or classifier_from_token with method "
                    f"({', '.join(TOKEN_METHODS)}) in config.json to build it from the LM head; this checkpoint "
                    "has neither")
            return set()
        if lm_head_weight is None and self.tied_head is not None:
            partition = getattr(self.tied_head, "vocab_partition", None)
            if partition is not None and not partition.is_whole:  # this rank holds only some of the rows
                raise ValueError(f"classifier_from_token with method {method} on a tied LM head is not supported "
                                 f"with tensor_parallel_size {partition.tp_size}; use tensor_parallel_size=1")
            lm_head_weight = getattr(self.tied_head, "weight", None)
        if (not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2
                or not lm_head_weight.is_floating_point()):  # a quantized head's codes aren't its rows
            raise ValueError(f"classifier_from_token with method {method}: needs the LM head's dense weight "
                             "(lm_head.weight, or the tied embedding table), which this checkpoint doesn't have")
        ids = token_ids(tokens, self.model_config, lm_head_weight.shape[0])
        rows = lm_head_weight[ids].float()
        weight = rows[1:2] - rows[0:1] if method == "from_2_way_softmax" else rows
        param = self.pooler.head.weight
        param.weight_loader(param, weight.to(param.dtype))
        return {"pooler.head.weight"}


def classifier_tokens(config: Any) -> tuple[list[Any] | None, str | None]:
    """``(classifier_from_token, method)`` from the config, checked; ``(None, None)`` without them."""
    tokens = getattr(config, "classifier_from_token", None)
    method = getattr(config, "method", None)
    if method is None and getattr(config, "is_original_qwen3_reranker", False):
        method = "from_2_way_softmax"
    if tokens is None and method is None:
        return None, None
    if tokens is None or method is None:
        raise ValueError("a classifier converted from a causal LM's token logits needs both classifier_from_token "
                         f"and method ({', '.join(TOKEN_METHODS)}) in its config; it has only "
                         f"{'classifier_from_token' if method is None else 'method'}")
    if method not in TOKEN_METHODS:
        raise ValueError(f"method {method!r} is not supported; supported: {', '.join(TOKEN_METHODS)}")
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ValueError(f"method from_2_way_softmax needs two classifier_from_token entries [false, true], got "
                         f"{len(tokens)}")
    if not tokens:
        raise ValueError("classifier_from_token is empty")
    return list(tokens), method


def token_ids(tokens: list[Any], model_config: Any, vocab: int) -> list[int]:
    """Token ids of ``classifier_from_token`` entries: ids as given, strings through the model's tokenizer."""
    ids, tokenizer = [], None
    for token in tokens:
        if isinstance(token, str):
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer or model_config.path,
                                                          trust_remote_code=model_config.trust_remote_code)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"classifier_from_token {token!r} is not a token of the model's tokenizer")
        else:
            token_id = int(token)
        if not 0 <= token_id < vocab:
            raise ValueError(f"classifier_from_token {token!r}: id {token_id} is outside the vocabulary ({vocab})")
        ids.append(token_id)
    return ids
