"""Data parallelism: ``data_parallel_size`` engine replicas serving requests side by side (``-dp N``)."""

from __future__ import annotations

from typing import Any


def build_engine(engine_args: Any) -> Any:
    """The engine for ``engine_args``: an ``LLMEngine``, or with ``data_parallel_size > 1`` a
    :class:`~pagoda.engine_dp.client.DPEngineClient` over that many replicas (each an ``LLMEngine`` process)."""
    size = engine_args.data_parallel_size
    if isinstance(size, int) and not isinstance(size, bool) and size > 1:
        from pagoda.engine_dp.client import DPEngineClient

        return DPEngineClient(engine_args)
    from pagoda.core.engine import LLMEngine

    return LLMEngine.from_engine_args(engine_args)  # checks data_parallel_size itself
