"""The ``pagoda serve`` command line (no model is loaded: these fail or exit before that)."""

from __future__ import annotations

import subprocess
import sys


def pagoda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_server_and_engine_flags():
    result = pagoda("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--chat-template", "--max-log-len",
                 "--uvicorn-log-level", "--shutdown-timeout", "--disable-log-stats", "--max-model-len", "--model",
                 "MODEL"):
        assert flag in result.stdout, flag


def test_conflicting_models_are_an_error():
    result = pagoda("model-a", "--model", "model-b")
    assert result.returncode == 1
    assert "model-a" in result.stderr and "model-b" in result.stderr


def test_bad_chat_template_is_an_error():
    result = pagoda("--chat-template", "/no/such/template.jinja")
    assert result.returncode == 1 and "--chat-template" in result.stderr


def test_server_steps_take_the_platforms_serving_budget(tiny_server):
    from pagoda.platforms import resolve_platform

    budget = resolve_platform("auto").default_max_num_batched_tokens("openai_api_server")
    assert f"{budget} tokens a step" in tiny_server.output()
