"""Shared set-up of the Triton kernel tests: kernels jitted under this process's ``TRITON_INTERPRET``."""

from __future__ import annotations

import importlib
import os

import pytest


def fresh_kernels(module_name: str, jit_cache: str):
    """``pagoda.platforms.<module_name>`` with its jitted kernels (the ``functools.cache``d ``jit_cache``) dropped,
    so they are jitted again under this test module's ``TRITON_INTERPRET``, whatever ran before."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its library functions can't be "
                    "interpreted: whatever imported it at collection time must import it lazily")
    module = importlib.import_module(f"pagoda.platforms.{module_name}")
    getattr(module, jit_cache).cache_clear()
    return module
