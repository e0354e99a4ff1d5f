"""``pagoda bench ...`` end to end on a tiny model: the commands run, count tokens right and write valid JSON.

Nothing here asserts a speed; the checks are on what the figures must satisfy whatever the machine.
"""

from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.cli import main as cli_main

ENGINE = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20)]


def _run(args: list[str], tmp_path) -> dict:
    out = tmp_path / "result.json"
    assert cli_main(["bench", *args, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_counts_every_token(tiny_chat_model_dir, tmp_path, capsys):
    result = _run(["throughput", "--model", tiny_chat_model_dir, *ENGINE, "--dataset-name", "random",
                   "--input-len", "12", "--output-len", "5", "--num-prompts", "3", "--num-iters", "2"], tmp_path)
    assert result["num_requests"] == 3
    assert result["num_prompt_tokens"] == 36 and result["num_output_tokens"] == 15  # ignore_eos: exact lengths
    assert result["total_num_tokens"] == 51
    assert len(result["all_elapsed_times"]) == 2 and result["elapsed_time"] in result["all_elapsed_times"]
    assert result["output_tokens_per_second"] == pytest.approx(15 / result["elapsed_time"])
    assert result["tokens_per_second"] == pytest.approx(51 / result["elapsed_time"])
    assert "Throughput:" in capsys.readouterr().out


def test_throughput_spreads_requests_over_generated_lora_adapters(tiny_chat_model_dir, tmp_path):
    result = _run(["throughput", "--model", tiny_chat_model_dir, *ENGINE, "--dataset-name", "random",
                   "--input-len", "12", "--output-len", "4", "--num-prompts", "4", "--num-iters", "1",
                   "--num-loras", "2", "--lora-rank", "4", "--max-loras", "2"], tmp_path)
    assert result["num_loras"] == 2
    assert result["num_prompt_tokens"] == 48 and result["num_output_tokens"] == 16


def test_throughput_random_flags_and_range_ratio(tiny_chat_model_dir, tmp_path):
    result = _run(["throughput", "--model", tiny_chat_model_dir, *ENGINE, "--random-input-len", "20",
                   "--random-output-len", "6", "--random-range-ratio", "0.5", "--num-prompts", "3", "--seed", "5",
                   "--no-warmup"], tmp_path)
    assert 3 * 10 <= result["num_prompt_tokens"] <= 3 * 30
    assert 3 * 3 <= result["num_output_tokens"] <= 3 * 9


def test_latency_reports_ttft_within_latency(tiny_chat_model_dir, tmp_path, capsys):
    result = _run(["latency", "--model", tiny_chat_model_dir, *ENGINE, "--input-len", "8", "--output-len", "6",
                   "--batch-size", "2", "--num-iters-warmup", "1", "--num-iters", "2"], tmp_path)
    assert len(result["latencies"]) == 2 and len(result["ttfts"]) == 2
    assert all(0 < t < lat for t, lat in zip(result["ttfts"], result["latencies"]))
    assert result["avg_latency"] == pytest.approx(sum(result["latencies"]) / 2)
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert result["median_decode_tokens_per_second"] > 0
    assert "Avg latency:" in capsys.readouterr().out


def test_step_overhead_splits_model_from_engine(tiny_chat_model_dir, tmp_path, capsys):
    result = _run(["step-overhead", "--model", tiny_chat_model_dir, *ENGINE, "--load-format", "dummy",
                   "--num-requests", "3", "--input-len", "8", "--num-steps", "4"], tmp_path)
    assert result["num_requests"] == 3 and result["num_steps"] == 4
    stages = result["stages_ms"]
    for name in ("model.forward", "model.compute_logits", "scheduler.schedule", "runner.build_batch",
                 "runner.sampler", "output_processor.process"):
        assert stages[name]["mean"] > 0, name
    # The parts can't exceed the whole: the model and each stage lie inside the step.
    assert result["model_ms"]["mean"] < result["step_ms"]["mean"]
    assert result["overhead_ms"]["mean"] == pytest.approx(result["step_ms"]["mean"] - result["model_ms"]["mean"])
    assert stages["runner.sampler"]["mean"] < result["overhead_ms"]["mean"]
    assert "engine overhead" in capsys.readouterr().out


def test_step_overhead_times_the_phases_of_a_fused_decode_step(tiny_chat_model_dir, tmp_path, capsys):
    from pagoda.platforms.cpu.kernels import cpu

    if not (cpu.kernels() and cpu.kernels().has_packed_bf16):
        pytest.skip(f"native bf16 kernels unavailable: {cpu.unavailable_reason() or 'no AVX512-BF16'}")
    engine = [*ENGINE[2:], "--dtype", "bfloat16"]  # the CPU fuses bf16 decode steps
    result = _run(["step-overhead", "--model", tiny_chat_model_dir, *engine, "--load-format", "dummy",
                   "--num-requests", "3", "--input-len", "8", "--num-steps", "4"], tmp_path)
    stages = result["stages_ms"]
    for name in ("norms", "qkv_proj", "write_kv", "attention", "o_proj", "mlp_in", "activation", "mlp_out"):
        assert stages[f"fused.{name}"]["mean"] > 0, name
    assert stages["fused.experts"]["mean"] == 0  # a dense model
    inside = sum(v["mean"] for name, v in stages.items() if name.startswith("fused."))
    assert inside < stages["model.forward"]["mean"]  # the phases lie inside the model's forward
    out = capsys.readouterr().out
    assert "inside the model's fused decode step" in out and "experts" not in out


def test_bench_without_a_benchmark_prints_help(capsys):
    assert cli_main(["bench"]) == 2
    assert "step-overhead" in capsys.readouterr().out


def test_bad_flag_value_is_a_one_line_error(tiny_chat_model_dir, capsys):
    assert cli_main(["bench", "latency", "--model", tiny_chat_model_dir, *ENGINE, "--batch-size", "0"]) == 1
    assert "batch_size: must be >= 1" in capsys.readouterr().err


def test_ops_layer_sweep_reports_each_linear_at_three_batch_sizes(tmp_path):
    result = _run(["ops", "--iters", "1", "--layers", "2"], tmp_path)
    swept = [r for r in result["ops"] if r["shape"].startswith("2 layers")]
    assert {r["op"] for r in swept} >= {"linear_dense", "linear_codebook"}
    for op in {r["op"] for r in swept}:
        rows = {r["workload"]: r for r in swept if r["op"] == op}
        assert set(rows) == {"W2", "W1 decode", "W1 prefill"}
        for workload, m in (("W2", 1), ("W1 decode", 64), ("W1 prefill", 2048)):
            row = rows[workload]
            assert row["shape"] == f"2 layers, {m} rows" and row["ms"] > 0
            # The rate is the work over the time: 2 layers of SmolLM2-135M's four projections.
            flops = 2.0 * m * 2 * (960 * 576 + 576 * 576 + 3072 * 576 + 576 * 1536)
            gflops = float(row["rate"].split(" GFLOP/s")[0])
            assert gflops == pytest.approx(flops / (row["ms"] / 1e3) / 1e9, rel=0.01, abs=1)
            if op == "linear_codebook":  # AQLM 2x8 reads a quarter of a byte a weight
                gbs = float(row["rate"].split(", ")[1].split(" GB/s")[0])
                assert gbs == pytest.approx(flops / (2 * m) * 0.25 / (row["ms"] / 1e3) / 1e9, rel=0.02, abs=0.1)
