"""The `pagoda` command: generate, chat (interactive, streaming), and errors without tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PAGODA = [sys.executable, "-m", "pagoda.entrypoints.cli"]
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "0.25", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(PAGODA + args, capture_output=True, text=True, timeout=300, env=ENV, **kwargs)


def test_help_lists_subcommands_and_engine_flags():
    top = _run(["--help"])
    assert top.returncode == 0 and all(c in top.stdout for c in ("generate", "chat", "serve", "env", "bench"))
    sub = _run(["generate", "--help"])
    assert "--max-num-batched-tokens" in sub.stdout and "--temperature" in sub.stdout


@pytest.mark.slow
def test_generate_with_the_bundled_model():
    result = _run(["generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_exits_on_eof():
    result = _run(["chat", "--temperature", "0", "--max-tokens", "24"],
                  input="What is the capital of France?\nAnd which river runs through it?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.count("> ") == 3  # two turns, then the prompt that read EOF
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_chat_exits_cleanly_on_ctrl_c():
    proc = subprocess.Popen(PAGODA + ["chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    # Wait until the model is loaded and the prompt is shown, then press Ctrl-C at it.
    banner = ""
    while "Ctrl-D" not in banner and time.time() < deadline:
        banner += proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_not_the_chat():
    proc = subprocess.Popen(PAGODA + ["chat", "--ignore-eos", "--max-tokens", "4000"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.time() + 240
        banner = b""
        while b"Ctrl-D quits" not in banner and time.time() < deadline:
            banner += proc.stderr.readline()
        proc.stdin.write(b"Count from one to one thousand in words.\n")
        proc.stdin.flush()
        streamed = b""
        while len(streamed) < 40 and time.time() < deadline:  # the prompt "> ", then the reply streaming
            streamed += proc.stdout.read1(4096)
        proc.send_signal(signal.SIGINT)  # mid-reply: stops it (4000 tokens would take far longer)
        out, err = proc.communicate(b"/clear\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"(reply stopped)" in err and b"(conversation cleared)" in err
    assert b"Traceback" not in err
    assert (streamed + out).count(b"> ") == 3  # the question, /clear, then the prompt that read EOF


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"NOTAGGUF" + b"\0" * 64, "GGUF"),
    (b"GGUF\x03\x00\x00\x00" + b"\0" * 8, "GGUF"),
])
def test_bad_model_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    result = _run(["generate", "--model", str(path), "hi"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and message in result.stderr
