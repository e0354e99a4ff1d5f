"""``AsyncEngine.build``: the server's engine is built on the thread that later runs its steps (one OpenMP worker
pool for both), a failed build raises in the caller, and a built engine that never started still stops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pagoda.core.engine import LLMEngine
from pagoda.core.engine_args import EngineArgs
from pagoda.entrypoints.openai.async_engine import AsyncEngine
from pagoda.sampling_params import RequestOutputKind, SamplingParams


def _make_engine(model_dir: str, threads: dict[str, int]) -> LLMEngine:
    threads["build"] = threading.get_ident()
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_dir, dtype="float32", max_model_len=512,
                                                   kv_cache_memory_bytes=8 << 20))
    real_step = engine.step

    def step():
        threads.setdefault("step", threading.get_ident())
        return real_step()

    engine.step = step
    return engine


def test_build_runs_the_engine_on_the_thread_that_built_it(tiny_chat_model_dir):
    threads: dict[str, int] = {}
    async_engine = AsyncEngine.build(lambda: _make_engine(tiny_chat_model_dir, threads))
    assert threads["build"] != threading.get_ident()
    assert "step" not in threads  # nothing runs before start()

    async def serve_one() -> str:
        async_engine.start()
        try:
            group = async_engine.new_group("r0")
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            await group.add([{"prompt": "Hello", "prompt_token_ids": [1, 2, 3]}], params)
            token_ids = []
            async for _, output in group:
                token_ids += output.outputs[0].token_ids
            return token_ids
        finally:
            await async_engine.stop()

    assert len(asyncio.run(serve_one())) == 4
    assert threads["step"] == threads["build"]
    assert not async_engine.is_healthy  # stopped


def test_build_raises_the_engines_error():
    def broken():
        raise ValueError("max_model_len: 0 is not allowed")

    with pytest.raises(ValueError, match="max_model_len"):
        AsyncEngine.build(broken)


def test_a_built_engine_that_never_started_still_stops(tiny_chat_model_dir):
    async_engine = AsyncEngine.build(lambda: _make_engine(tiny_chat_model_dir, {}))
    asyncio.run(async_engine.stop(timeout=30))
    assert not async_engine._thread.is_alive()
