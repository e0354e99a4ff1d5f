"""Poolers: how a pooling model turns the hidden states of a prompt into its output.

A pooling model exposes ``model.pooler(hidden_slices, params, token_ids) -> list[Tensor]`` (one hidden-state slice
``[n_i, H]`` per request, in the model dtype). :class:`EmbeddingPooler` returns an embedding per request;
:class:`ClassifierPooler` runs a classification head on the pooled state and returns class probabilities (or one
score for the ``score`` task).

Which token(s) are pooled and whether embeddings are normalized come from, in order of precedence:
``--override-pooler-config``, the model's sentence-transformers files (``modules.json`` naming a ``Pooling``
module with its ``config.json``, and a ``Normalize`` module), then the architecture's defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.plugins.hookspecs import hookimpl
from pagoda.pooling_params import PoolingParams

POOLING_TYPES = ("LAST", "CLS", "MEAN")
OVERRIDE_KEYS = ("pooling_type", "normalize", "activation", "softmax")
# sentence-transformers Pooling config key → our pooling type
_ST_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_lasttoken": "LAST"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolerConfig:
    """The resolved pooling of a model. ``activation``: classifiers apply softmax (sigmoid for one label)."""

    pooling_type: str
    normalize: bool = False
    activation: bool = True


def sentence_transformers_pooling(path: str) -> dict[str, Any] | None:
    """``{"pooling_type", "normalize"}`` from a sentence-transformers model directory, or None if it isn't one."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return None
    with open(modules_file) as f:
        modules = json.load(f)
    result: dict[str, Any] = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling is None:
        return result
    config_file = os.path.join(path, pooling.get("path", ""), "config.json")
    if not os.path.isfile(config_file):
        return result
    with open(config_file) as f:
        config = json.load(f)
    chosen = [mode for key, mode in _ST_MODES.items() if config.get(key)]
    unsupported = [key for key in _ST_UNSUPPORTED if config.get(key)]
    if unsupported or len(chosen) > 1:
        raise ValueError(f"{config_file}: pooling {', '.join(unsupported + chosen)} is not supported; one of "
                         f"{', '.join(_ST_MODES)} is")
    if chosen:
        result["pooling_type"] = chosen[0]
    return result


def resolve_pooler_config(model_config: Any, *, pooling_type: str, normalize: bool = False,
                          activation: bool = True) -> PoolerConfig:
    """The model's pooling: the architecture defaults given here, overridden by its sentence-transformers files,
    overridden by ``override_pooler_config`` (vLLM's keys: pooling_type, normalize, softmax/activation)."""
    values: dict[str, Any] = {"pooling_type": pooling_type, "normalize": normalize, "activation": activation}
    path = getattr(model_config, "path", None)
    if path and os.path.isdir(path):
        values.update(sentence_transformers_pooling(path) or {})
    override = dict(getattr(model_config, "override_pooler_config", None) or {})
    unknown = sorted(set(override) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"override_pooler_config: unknown key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(OVERRIDE_KEYS)}")
    if "softmax" in override:  # vLLM's older name of the classifier activation
        softmax = override.pop("softmax")
        override.setdefault("activation", softmax)
    values.update({k: v for k, v in override.items() if v is not None})
    kind = str(values["pooling_type"]).upper()
    if kind not in POOLING_TYPES:
        raise ValueError(f"pooling_type: {values['pooling_type']!r} is not supported; use one of "
                         f"{', '.join(POOLING_TYPES)}")
    for name in ("normalize", "activation"):
        if not isinstance(values[name], bool):
            raise ValueError(f"override_pooler_config: {name} must be true or false, got {values[name]!r}")
    return PoolerConfig(kind, values["normalize"], values["activation"])


def pool_hidden(hidden_slices: list[torch.Tensor], pooling_type: str) -> torch.Tensor:
    """``[num_requests, H]``: the first token (CLS), the last token (LAST) or the mean (MEAN, in float32) of
    each request's hidden states."""
    if pooling_type == "CLS":
        return torch.stack([h[0] for h in hidden_slices])
    if pooling_type == "LAST":
        return torch.stack([h[-1] for h in hidden_slices])
    return torch.stack([h.float().mean(dim=0) for h in hidden_slices])


class EmbeddingPooler(nn.Module):
    """Pooled hidden state → embedding, optionally truncated to ``dimensions`` (Matryoshka) and then L2
    normalized (``normalize``, default from the model's pooling config)."""

    supported_tasks = ("embed", "encode")

    def __init__(self, config: PoolerConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size

    def check(self, params: PoolingParams, task: str) -> None:
        """Raise ``ValueError`` for a request this pooler can't serve (called before the request is added)."""
        if task not in self.supported_tasks:
            raise ValueError(f"this embedding model can't serve the {task!r} task; it serves "
                             f"{', '.join(self.supported_tasks)}")
        params.verify(task)
        if params.dimensions is not None and params.dimensions > self.hidden_size:
            raise ValueError(f"dimensions: {params.dimensions} is larger than the model's embedding size "
                             f"{self.hidden_size}")

    def forward(self, hidden_slices: list[torch.Tensor], params: list[PoolingParams],
                token_ids: list[list[int]]) -> list[torch.Tensor]:
        pooled = pool_hidden(hidden_slices, self.config.pooling_type).float()
        norms = [self.config.normalize if p.normalize is None else p.normalize for p in params]
        if all(p.dimensions is None for p in params):  # the common case: one op over the whole batch
            if all(norms):
                return list(F.normalize(pooled, dim=-1).unbind(0))
            if not any(norms):
                return list(pooled.unbind(0))
        out = []
        for row, p, norm in zip(pooled, params, norms):
            if p.dimensions is not None:
                row = row[:p.dimensions]
            out.append(F.normalize(row, dim=-1) if norm else row)
        return out


class ClassifierPooler(nn.Module):
    """Pooled hidden state → ``head`` → logits → softmax (sigmoid for a single label) unless the request or the
    config turns the activation off. The ``score`` task returns the single label's value as a scalar."""

    supported_tasks = ("classify", "score", "encode")

    def __init__(self, config: PoolerConfig, head: nn.Module, num_labels: int,
                 pool: Callable[[list[torch.Tensor], str], torch.Tensor] = pool_hidden) -> None:
        super().__init__()
        self.config = config
        self.head = head
        self.num_labels = num_labels
        self.pool = pool

    def check(self, params: PoolingParams, task: str) -> None:
        if task not in self.supported_tasks:
            raise ValueError(f"this classification model can't serve the {task!r} task; it serves "
                             f"{', '.join(self.supported_tasks)}")
        params.verify(task)
        if task == "score" and self.num_labels != 1:
            raise ValueError(f"score needs a model with one output label (a cross-encoder); this one has "
                             f"{self.num_labels}: use classify")

    def forward(self, hidden_slices: list[torch.Tensor], params: list[PoolingParams],
                token_ids: list[list[int]]) -> list[torch.Tensor]:
        # MEAN pools in float32; the head runs in the model dtype
        pooled = self.pool(hidden_slices, self.config.pooling_type).to(hidden_slices[0].dtype)
        logits = self.head(pooled).float()  # [num_requests, num_labels]
        activate = torch.tensor([self.config.activation if p.activation is None else p.activation for p in params],
                                device=logits.device)
        probs = torch.sigmoid(logits) if self.num_labels == 1 else torch.softmax(logits, dim=-1)
        out = torch.where(activate[:, None], probs, logits)
        return [row[0] if p.task == "score" else row for row, p in zip(out, params)]


@hookimpl
def pagoda_register_models():
    """The pooling models: BERT and XLM-RoBERTa encoders, Llama-family embedders and classifiers."""
    from pagoda.models import bert, llama_pooling, roberta

    return {**bert.MODELS, **roberta.MODELS, **llama_pooling.MODELS}
