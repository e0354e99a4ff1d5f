"""What a generation request returns, shaped like vLLM's ``vllm.outputs`` classes.

Logprobs follow vLLM: each generated position has a ``dict[int, Logprob]`` holding the sampled token and the
requested top-k tokens (the sampled one first, so it is there even when it is not in the top-k); prompt
logprobs are a list with ``None`` for the first prompt token, which nothing predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Logprob:
    """The log-probability of one token at one position.

    ``rank`` is 1 for the most likely token; ``decoded_token`` is the token's text (None when the request
    did not detokenize).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Logprobs of one position, keyed by token id.
PositionLogprobs = dict[int, Logprob]
#: Logprobs of a generated sequence, one dict per generated token.
SampleLogprobs = list[PositionLogprobs]
#: Logprobs of a prompt; the first entry is None (no token predicts the first prompt token).
PromptLogprobs = list[PositionLogprobs | None]


@dataclass
class CompletionOutput:
    """One completion of a request (there are ``n`` of them).

    ``finish_reason`` is None while generating, then "stop" (EOS, a stop token id or a stop string),
    "length" (max_tokens or the context length) or "abort". ``stop_reason`` says which stop ended it: the
    stop string, or the stop token id; it is None for EOS and for any other finish.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
            f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason})"
        )


@dataclass
class RequestMetrics:
    """Timestamps (``time.time()``) of one request's life; None until the event happens."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request as returned by ``LLM.generate`` or streamed by the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
            f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics})"
        )


@dataclass
class PoolingOutput:
    """The pooled result of one prompt: an embedding, class probabilities, a score … (``data``, float32)."""

    data: Any

    def __repr__(self) -> str:
        return f"PoolingOutput(data={self.data!r})"


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class EmbeddingOutput:
    """An embedding vector (``LLM.embed``)."""

    embedding: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> EmbeddingOutput:
        data = pooling_output.data
        if data.ndim != 1:
            raise ValueError(f"an embedding must be a 1-D vector; the pooler returned shape {tuple(data.shape)}")
        return EmbeddingOutput(data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    outputs: EmbeddingOutput  # type: ignore[assignment]

    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return EmbeddingRequestOutput(request_output.request_id, EmbeddingOutput.from_base(request_output.outputs),
                                      request_output.prompt_token_ids, request_output.finished, request_output.prompt)


@dataclass
class ClassificationOutput:
    """Class probabilities (``LLM.classify``; raw logits when the request turned the activation off)."""

    probs: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ClassificationOutput:
        data = pooling_output.data
        if data.ndim != 1:
            raise ValueError(f"class probabilities must be a 1-D vector; the pooler returned shape "
                             f"{tuple(data.shape)}")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput):
    outputs: ClassificationOutput  # type: ignore[assignment]

    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> ClassificationRequestOutput:
        return ClassificationRequestOutput(
            request_output.request_id, ClassificationOutput.from_base(request_output.outputs),
            request_output.prompt_token_ids, request_output.finished, request_output.prompt)


@dataclass
class ScoringOutput:
    """The relevance score of one text pair (``LLM.score``)."""

    score: float

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ScoringOutput:
        data = pooling_output.data
        if data.numel() != 1:
            raise ValueError(f"a score must be a single number; the pooler returned shape {tuple(data.shape)}")
        return ScoringOutput(float(data.reshape(())))


@dataclass
class ScoringRequestOutput(PoolingRequestOutput):
    outputs: ScoringOutput  # type: ignore[assignment]

    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> ScoringRequestOutput:
        return ScoringRequestOutput(request_output.request_id, ScoringOutput.from_base(request_output.outputs),
                                    request_output.prompt_token_ids, request_output.finished, request_output.prompt)
