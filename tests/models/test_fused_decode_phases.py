"""The fused CPU decode step times the phases of its layer loop when asked (``pagoda bench step-overhead`` prints
them): each phase a model's layers have takes time, the others stay at zero, and timing changes no number."""

from __future__ import annotations

import time

import pytest

from pagoda import LLM
from pagoda.platforms.cpu.fused_decode import PHASES
from tests.models.checkpoint_variants import randomize_vectors
from tests.models.test_fused_decode import _run, pytestmark  # noqa: F401  (the native kernels' skip)
from tests.models.test_moe import CONFIGS as MOE_CONFIGS
from tests.models.test_qwen3 import qwen3_config

ATTENTION = {"norms", "qkv_proj", "rotary", "write_kv", "attention", "o_proj"}
DENSE_MLP = {"mlp_in", "activation", "mlp_out"}


def _model(tiny_model_dir, family: str) -> str:
    if family == "qwen3":
        return randomize_vectors(tiny_model_dir("qwen3", qwen3_config()))
    if family == "mixtral":
        return randomize_vectors(tiny_model_dir("mixtral", MOE_CONFIGS["mixtral"]()))
    return tiny_model_dir(family)


@pytest.mark.parametrize("family,phases", [
    ("llama", ATTENTION | DENSE_MLP),
    ("qwen3", ATTENTION | DENSE_MLP | {"qk_norms"}),  # per-head q/k norms
    ("mixtral", ATTENTION | {"experts"}),  # every layer routes to experts in place of the MLP
])
def test_fused_decode_times_the_phases_its_layers_have(tiny_model_dir, family, phases):
    llm = LLM(_model(tiny_model_dir, family), dtype="bfloat16", kv_cache_memory_bytes=1 << 24,
              enable_prefix_caching=False, skip_tokenizer_init=True, max_model_len=256)
    fused = llm.llm_engine.runner.fused_decode
    assert fused is not None, "decode steps were not fused"
    assert fused.take_phase_times() == {}  # not profiling
    expected = _run(llm, fused=True)

    fused.profile(True)
    start = time.perf_counter()
    assert _run(llm, fused=True) == expected  # timing changes no number
    elapsed = time.perf_counter() - start
    times = fused.take_phase_times()
    assert list(times) == list(PHASES)
    assert {name for name, seconds in times.items() if seconds > 0} == phases
    assert sum(times.values()) < elapsed  # the phases lie inside the decode steps
    assert set(fused.take_phase_times().values()) == {0.0}  # taken: the sums restart

    fused.profile(False)
    _run(llm, fused=True)
    assert fused.take_phase_times() == {}
