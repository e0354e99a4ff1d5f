"""``PoolingParams``: how a pooling model (embedding, classification, scoring) turns hidden states into output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POOLING_TASKS = ("encode", "embed", "classify", "score", "reward")


@dataclass
class PoolingParams:
    """Per-request pooling options, with vLLM's names.

    ``dimensions`` truncates embeddings (Matryoshka models) before normalization; ``normalize`` (embeddings)
    and ``activation`` (classification/score: softmax or sigmoid per the model) default to the model's
    configuration when None. ``task`` is set by the API that creates the request (``LLM.embed`` → "embed" …).
    """

    task: str | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    extra_kwargs: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {', '.join(POOLING_TASKS)}, got {self.task!r}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")

    # The scheduler and runner treat sampling and pooling requests alike where these agree.
    n = 1
    best_of = None
    prompt_logprobs = None
    logprobs = None
    seed = None

    def clone(self) -> PoolingParams:
        import copy

        return copy.deepcopy(self)

    def verify(self, task: str) -> None:
        """Check that every option set applies to ``task`` ("embed": dimensions, normalize; "classify" and
        "score": activation; "encode": any); raise ``ValueError`` naming the ones that don't."""
        allowed = _TASK_OPTIONS.get(task)
        if allowed is None:
            raise ValueError(f"task must be one of {', '.join(POOLING_TASKS)}, got {task!r}")
        given = {name for name in ("dimensions", "normalize", "activation") if getattr(self, name) is not None}
        bad = sorted(given - allowed)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not an option of the {task!r} task; it takes "
                             f"{', '.join(sorted(allowed)) or 'no options'}")


_TASK_OPTIONS = {
    "encode": {"dimensions", "normalize", "activation"},
    "embed": {"dimensions", "normalize"},
    "classify": {"activation"},
    "score": {"activation"},
    "reward": set(),
}
