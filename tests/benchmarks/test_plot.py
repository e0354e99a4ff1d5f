"""The concurrency sweep and its plot."""

import json

import pytest

from pagoda.benchmarks.plot import main


def test_sweep_then_draw(tiny_chat_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "sweep.json"
    assert main(["run", "--label", "tiny", "--json", str(data), "--concurrency", "1", "2", "--input-len", "6",
                 "--output-len", "3", "--model", tiny_chat_model_dir, "--dtype", "float32",
                 "--kv-cache-memory-bytes", str(64 << 20)]) == 0
    points = json.loads(data.read_text())["points"]
    assert [p["concurrency"] for p in points] == [1, 2]
    assert all(p["output_tokens_per_second"] > 0 for p in points)
    png = tmp_path / "plot.png"
    assert main(["draw", str(data), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
