"""``pagoda bench spec-decode`` on a tiny model: both engines run, the greedy outputs agree, and the JSON has the
figures (no speed is asserted)."""

from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.cli import main as cli_main

ENGINE = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20)]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_spec_decode_bench_runs(tiny_chat_model_dir, tmp_path, capsys, method):
    config = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
              if method == "ngram" else {"model": tiny_chat_model_dir, "num_speculative_tokens": 3})
    out = tmp_path / "result.json"
    assert cli_main(["bench", "spec-decode", "--model", tiny_chat_model_dir, *ENGINE, "--output-len", "12",
                     "--num-iters", "2", "--speculative-config", json.dumps(config), "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["outputs_identical"] is True
    for name in ("baseline", "speculative"):
        assert result[f"{name}_output_tokens_per_second"] > 0
    if method == "draft_model":  # the model as its own draft: every draft accepted
        assert result["num_draft_tokens"] > 0 and result["acceptance_rate"] == 1.0
    assert "Speed-up:" in capsys.readouterr().out


def test_spec_decode_bench_needs_a_config(tiny_chat_model_dir, capsys):
    assert cli_main(["bench", "spec-decode", "--model", tiny_chat_model_dir, *ENGINE, "--num-iters", "1"]) != 0
    assert "speculative_config" in capsys.readouterr().err
