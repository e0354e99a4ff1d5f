"""The Gemma, Gemma 2 and Gemma 3 (text) model family. Registered as a built-in plugin."""

from __future__ import annotations

from pagoda.plugins.hookspecs import hookimpl


@hookimpl
def pagoda_register_models():
    return {}
