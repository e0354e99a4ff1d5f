"""``pagoda bench serve`` against a live ``pagoda serve`` on a tiny model."""

from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.cli import main as cli_main
from tests.entrypoints.openai.conftest import TINY_ARGS, ServerProcess, free_port

KEY = "bench-key"


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir):
    process = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--api-key", KEY, "--disable-log-requests"])
    yield process
    process.stop()


def _bench(server, tmp_path, *extra: str) -> dict:
    out = tmp_path / "serve.json"
    assert cli_main(["bench", "serve", "--base-url", server.url, "--api-key", KEY, "--dataset-name", "random",
                     "--random-input-len", "10", "--random-output-len", "4", "--ignore-eos", "--disable-tqdm",
                     "--output-json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_all_requests_complete_with_exact_token_counts(server, tmp_path, capsys):
    result = _bench(server, tmp_path, "--num-prompts", "3", "--max-concurrency", "2")
    assert result["completed"] == 3 and result["failed"] == 0
    assert result["total_input_tokens"] == 30 and result["total_output_tokens"] == 12
    assert result["request_rate"] == "inf" and result["max_concurrency"] == 2
    assert result["output_throughput"] == pytest.approx(12 / result["duration"])
    assert result["total_token_throughput"] == pytest.approx(42 / result["duration"])
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert result["median_tpot_ms"] > 0 and result["p99_itl_ms"] >= result["median_itl_ms"] > 0
    printed = capsys.readouterr().out
    for line in ("Successful requests:", "Output token throughput (tok/s):", "Mean TTFT (ms):", "P99 TPOT (ms):",
                 "Median ITL (ms):"):
        assert line in printed


def test_poisson_arrivals_and_model_from_server(server, tmp_path):
    result = _bench(server, tmp_path, "--num-prompts", "2", "--request-rate", "50", "--seed", "1")
    assert result["completed"] == 2 and result["request_rate"] == 50
    assert result["model_id"]  # asked from /v1/models


def test_unreachable_server_fails_fast(capsys):
    code = cli_main(["bench", "serve", "--port", str(free_port()), "--model", "m", "--num-prompts", "2",
                     "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"])
    assert code == 1
    assert "test request" in capsys.readouterr().err


def test_wrong_api_key_fails_fast(server, capsys):
    code = cli_main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong", "--num-prompts", "2",
                     "--model", "x", "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"])
    assert code == 1
    assert "401" in capsys.readouterr().err
