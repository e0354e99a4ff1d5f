"""The example scripts run as a vLLM user would run theirs (with `vllm` renamed to `pagoda`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "offline_inference"
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "0.25"}


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=600, env=ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_basic():
    out = _run("basic.py")
    assert out.count("Generated text:") == 4


@pytest.mark.slow
def test_generate_with_engine_flags():
    out = _run("generate.py", "--max-model-len", "512", "--max_num_seqs", "4", "--no-enable-prefix-caching",
               "--max_tokens", "6", "--temperature", "0")
    assert out.count("Generated text:") == 3
    assert "Paris" in out


@pytest.mark.slow
def test_chat_answers_paris():
    out = _run("chat.py", "--max-tokens", "20")
    assert out.count("Generated text:") == 4
    assert "Paris" in out.splitlines()[0]
