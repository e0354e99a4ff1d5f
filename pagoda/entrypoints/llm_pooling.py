"""``LLM.encode`` / ``embed`` / ``classify`` / ``score``: the pooling half of the LLM API."""

from __future__ import annotations


class LLMPoolingMixin:
    """Pooling entry points of :class:`pagoda.LLM` (for models loaded with a pooling task)."""
