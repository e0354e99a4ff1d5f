"""The cost model of docs/distributed.md (``docs/plots/cost_model.py``): it runs, and its arithmetic matches a
hand-checked case."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "plots" / "cost_model.py"


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_script_prints_both_tables():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=True)
    assert "Llama-3-70B: 70.55 B parameters, 141.1 GB in bf16" in result.stdout
    assert "| TP=8 × PP=2 | decode | 64 |" in result.stdout
    assert "| TP=2 | decode | 1 |" in result.stdout


def test_formulas(cost_model):
    # attention 2·8192² + 2·8192·1024, MLP 3·8192·28672, 2 norms: 855,654,400 per layer; ×80, + 2·128256·8192 + 8192
    assert cost_model.LLAMA3_70B.num_params() == 70_553_706_496
    assert cost_model.LLAMA3_70B.kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2
    assert cost_model.ring_allreduce_s(1e6, 2, 1e9, 0.0) == pytest.approx(1e-3)  # 2·1/2 · 1 MB / 1 GB/s
    assert cost_model.ring_allreduce_s(1e6, 8, 1e9, 1e-5) == pytest.approx(2 * 7 / 8 * 1e-3 + 1e-5)
    assert cost_model.ring_allreduce_s(1e6, 1, 1e9, 1e-5) == 0.0
    assert cost_model.pipeline_bubble(2, 1) == pytest.approx(0.5)
    assert cost_model.pipeline_bubble(2, 2) == pytest.approx(1 / 3)


def test_tp16_decode_step_by_hand(cost_model):
    """Llama-3-70B, TP=16 across the two nodes, one sequence, empty cache: worked out on paper."""
    step = cost_model.step(cost_model.LLAMA3_70B, cost_model.H100_2X8, tp=16, batch=1)
    weights = 70_553_706_496 * 2 / 16 / 3.35e12  # 2.633 ms of HBM streaming per GPU
    assert step.weights_s == pytest.approx(weights)
    # 160 all-reduces of 1 × 8192 × 2 bytes over InfiniBand: 2·15/16 · 16384 B / 50 GB/s + 30 µs each
    assert step.allreduce_s == pytest.approx(160 * (2 * 15 / 16 * 16384 / 50e9 + 30e-6))  # 4.898 ms
    assert step.step_s == pytest.approx(weights + step.kv_s + step.allreduce_s)  # memory-bound: no compute term
    assert step.step_s == pytest.approx(7.531e-3, rel=1e-3)
    assert step.tokens_per_s == pytest.approx(1 / step.step_s)


def test_cpu_tp2_adds_the_guides_21_ms(cost_model):
    """The guide's measurement in the model: 30 layers × 2 gloo all-reduces of ≈ 350 µs ≈ 21 ms per decode step."""
    tp1 = cost_model.step(cost_model.SMOLLM2_135M, cost_model.CPU_2CORE, tp=1, batch=1)
    tp2 = cost_model.step(cost_model.SMOLLM2_135M, cost_model.CPU_2CORE, tp=2, batch=1)
    assert tp2.allreduce_s == pytest.approx(21e-3, rel=0.01)
    assert tp2.step_s > 2 * tp1.step_s
