"""``LLM.encode`` / ``embed`` / ``classify`` / ``score``: the pooling half of the LLM API (vLLM's).

Each call turns its prompts into pooling requests (``PoolingParams`` with the call's task), checks them against
the loaded model's pooler before anything runs, and lets ``LLM._run`` batch them through the engine (progress
bar and input order included). ``score`` pairs texts 1:1, 1:N (the first text broadcast) or N:N; cross-encoders
(classifier models with one label) score each pair as one tokenizer pair encoding, embedding models score the
cosine similarity of the two embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pagoda.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingOutput,
                            PoolingRequestOutput, ScoringRequestOutput)
from pagoda.pooling_params import PoolingParams

PromptType = str | dict[str, Any] | list[int]
# the model task each call needs (the task the model was loaded with, see LLM(task=...))
_CALL_TASKS = {"encode": ("embed", "classify", "score", "reward"), "embed": ("embed",),
               "classify": ("classify", "score"), "score": ("embed", "score", "classify")}


class LLMPoolingMixin:
    """Pooling entry points of :class:`pagoda.LLM` (for models loaded with a pooling task)."""

    llm_engine: Any

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True, *,
               truncate_prompt_tokens: int | None = None, lora_request: Any = None) -> list[PoolingRequestOutput]:
        """The pooler's raw output per prompt (``outputs.data``, a float32 tensor), in input order."""
        return self._pool("encode", prompts, pooling_params, use_tqdm, truncate_prompt_tokens, lora_request)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True, *,
              truncate_prompt_tokens: int | None = None, lora_request: Any = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``outputs.embedding``); ``PoolingParams(dimensions=, normalize=)``."""
        outputs = self._pool("embed", prompts, pooling_params, use_tqdm, truncate_prompt_tokens, lora_request)
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True, *,
                 truncate_prompt_tokens: int | None = None,
                 lora_request: Any = None) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (``outputs.probs``); ``PoolingParams(activation=False)``: logits."""
        outputs = self._pool("classify", prompts, pooling_params, use_tqdm, truncate_prompt_tokens, lora_request)
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], /, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None, lora_request: Any = None) -> list[ScoringRequestOutput]:
        """A relevance score per pair (``outputs.score``): ``text_1`` × ``text_2`` paired 1:1, 1:N or N:N."""
        texts_1 = [text_1] if isinstance(text_1, (str, dict)) else list(text_1)
        texts_2 = [text_2] if isinstance(text_2, (str, dict)) else list(text_2)
        if not texts_1:
            raise ValueError("text_1: give at least one text")
        if not texts_2:
            raise ValueError("text_2: give at least one text")
        if len(texts_1) > 1 and len(texts_1) != len(texts_2):
            raise ValueError(f"text_1 and text_2 must pair 1:1, 1:N or N:N; got {len(texts_1)} and {len(texts_2)} "
                             "texts")
        self._require_task("score")
        if self.llm_engine.model_config.task == "embed":
            return self._embedding_score(texts_1, texts_2, use_tqdm, truncate_prompt_tokens, pooling_params)
        return self._cross_encoding_score(texts_1 * len(texts_2) if len(texts_1) == 1 else texts_1, texts_2,
                                          use_tqdm, truncate_prompt_tokens, pooling_params)

    # ------------------------------------------------------------------ internals
    def _require_task(self, call: str) -> None:
        task = self.llm_engine.model_config.task
        if task not in _CALL_TASKS[call]:
            wanted = " or ".join(repr(t) for t in _CALL_TASKS[call])
            what = "text generation" if task == "generate" else f"the {task!r} task"
            raise ValueError(f"LLM.{call}: this model was loaded for {what}; {call} needs a model loaded with "
                             f"task={wanted} (see LLM(task=...))")

    def _pool(self, call: str, prompts: Any, pooling_params: Any, use_tqdm: bool,
              truncate_prompt_tokens: int | None, lora_request: Any) -> list[PoolingRequestOutput]:
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported yet")
        self._require_task(call)
        prompt_list = self._as_list(prompts)  # type: ignore[attr-defined]
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            given = [pooling_params or PoolingParams()] * len(prompt_list)
        else:
            given = list(pooling_params)
            if len(given) != len(prompt_list):
                raise ValueError(f"pooling_params: got {len(given)} for {len(prompt_list)} prompts; give one, or "
                                 "one per prompt")
        pooler = self.llm_engine.pooler
        params_list = []
        for params in given:
            params = params.clone()
            params.task = call
            if truncate_prompt_tokens is not None:
                params.truncate_prompt_tokens = truncate_prompt_tokens
            pooler.check(params, call)
            params_list.append(params)
        return self._run(prompt_list, params_list, use_tqdm)  # type: ignore[attr-defined]

    def _embedding_score(self, texts_1: list[Any], texts_2: list[Any], use_tqdm: bool,
                         truncate_prompt_tokens: int | None, pooling_params: PoolingParams | None
                         ) -> list[ScoringRequestOutput]:
        """Bi-encoder: cosine similarity of the two embeddings (each distinct side embedded once)."""
        params = pooling_params.clone() if pooling_params is not None else PoolingParams()
        params.activation = None  # a score option; cosine similarity has none
        embedded = self._pool("embed", texts_1 + texts_2, params, use_tqdm, truncate_prompt_tokens, None)
        first, second = embedded[:len(texts_1)], embedded[len(texts_1):]
        if len(first) == 1:
            first = first * len(second)
        left = torch.stack([o.outputs.data for o in first])
        right = torch.stack([o.outputs.data for o in second])
        scores = torch.nn.functional.cosine_similarity(left, right, dim=-1)
        return [ScoringRequestOutput.from_base(PoolingRequestOutput(
            f"{a.request_id}_{b.request_id}", PoolingOutput(score), a.prompt_token_ids + b.prompt_token_ids))
            for a, b, score in zip(first, second, scores)]

    def _cross_encoding_score(self, texts_1: list[Any], texts_2: list[Any], use_tqdm: bool,
                              truncate_prompt_tokens: int | None, pooling_params: PoolingParams | None
                              ) -> list[ScoringRequestOutput]:
        """Cross-encoder: each pair as one tokenizer pair encoding (with token type ids where the tokenizer
        makes them), scored by the classifier head."""
        prompts = [pair_prompt(self.llm_engine.tokenizer, a, b, truncate_prompt_tokens)
                   for a, b in zip(texts_1, texts_2)]
        outputs = self._pool("score", prompts, pooling_params, use_tqdm, None, None)
        return [ScoringRequestOutput.from_base(o) for o in outputs]


def pair_prompt(tokenizer: Any, text_1: Any, text_2: Any, truncate_prompt_tokens: int | None = None
                ) -> dict[str, Any]:
    """The engine prompt of a cross-encoder pair: ``{"prompt_token_ids", "token_type_ids"}``."""
    if tokenizer is None:
        raise ValueError("score: a cross-encoder needs the tokenizer to encode text pairs (not skip_tokenizer_init)")
    if not isinstance(text_1, str) or not isinstance(text_2, str):
        raise ValueError("score: a cross-encoder scores text pairs; text_1 and text_2 must be strings")
    kwargs = {"truncation": True, "max_length": truncate_prompt_tokens} if truncate_prompt_tokens else {}
    encoded = tokenizer(text_1, text_pair=text_2, **kwargs)
    prompt: dict[str, Any] = {"prompt_token_ids": list(encoded["input_ids"])}
    if encoded.get("token_type_ids") is not None:
        prompt["token_type_ids"] = list(encoded["token_type_ids"])
    return prompt
