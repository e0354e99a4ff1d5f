"""The Qwen3 (Qwen3ForCausalLM) model family. Registered as a built-in plugin."""

from __future__ import annotations

from pagoda.plugins.hookspecs import hookimpl


@hookimpl
def pagoda_register_models():
    return {}
