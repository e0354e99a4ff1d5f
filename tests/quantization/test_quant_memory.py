"""Resident weight memory of every tool-made quantized checkpoint, against the checkpoint's bytes for the same
layers (``docs/plots/quant_memory.py``, the figures in docs/benchmarks.md): within a tenth, so no format keeps a
dense copy or widens its codes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.quantization.test_quantized_checkpoints import CHECKPOINTS, FIXTURES

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "plots" / "quant_memory.py"
# aqlm_2x8's codebooks (two books of 256 entries of 8 values per shard, held as float32 for the one-row table) are
# as large as its tiny layers' codes; on SmolLM2-135M's AQLM 2x8 layers the ratio is 1.07 (docs/benchmarks.md).
BOOKS_DOMINATE = {"aqlm_2x8"}


@pytest.fixture(scope="module")
def quant_memory():
    spec = importlib.util.spec_from_file_location("quant_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_memory"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if n not in BOOKS_DOMINATE])
def test_resident_weights_within_a_tenth_of_the_checkpoint(quant_memory, name):
    import torch

    from pagoda.ops import select_ops
    from pagoda.platforms import resolve_platform

    block_quant = select_ops(resolve_platform(), torch.bfloat16).linear_block_quant
    if block_quant.is_reference:
        pytest.skip("the compact forms are the native kernels'; here linear_block_quant is the torch reference "
                    "(no implementation for this platform's bf16 models)")
    m = quant_memory.measure(str(FIXTURES / name))
    assert m["layers"] >= 2 and m["checkpoint"] > 0
    assert m["resident"] <= 1.1 * m["checkpoint"], f"{name}: {m}"
    assert "Int8Kernel" not in m["kinds"] and "DenseKernel" not in m["kinds"], m["kinds"]
