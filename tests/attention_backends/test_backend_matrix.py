"""Every registered attention backend against a float64 reference over hand-built paged batches.

Backends that can't run here skip with the reasons their ``validate`` gives (the end-of-run summary lists
them). Shapes are tiny so the whole matrix, Triton interpreter included, stays fast on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from attn_cases import CASES, TOLERANCE, run_case
from pagoda.attention_backends.interface import AttentionConfig
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import get_registry

BACKENDS = sorted(get_registry().attention_backends)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}

# The full cross product over case x heads x block size x dtype at head size 64, then the other head sizes on
# the case that exercises every path at once (mixed decode + prefill-with-context), and sliding windows.
PARAMS = [(case, heads, 64, bs, dt, None) for case in CASES for heads in HEADS for bs in (16, 32) for dt in DTYPES]
PARAMS += [("mixed", "gqa", hs, 16, dt, None) for hs in (80, 128, 256) for dt in ("fp32", "bf16")]
PARAMS += [(case, "gqa", 64, 16, "fp32", 8) for case in ("chunked", "mixed")]


def _id(p):
    case, heads, hs, bs, dt, window = p
    return f"{case}-{heads}-d{hs}-b{bs}-{dt}" + (f"-sw{window}" if window else "")


@pytest.fixture(scope="module")
def platform():
    return resolve_platform("auto")


@pytest.mark.parametrize("params", PARAMS, ids=[_id(p) for p in PARAMS])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_matrix(backend_name, params, platform):
    case, heads, head_size, block_size, dtype_name, window = params
    num_heads, num_kv_heads = HEADS[heads]
    backend = get_registry().attention_backends[backend_name]
    config = AttentionConfig(platform=platform.name, dtype=DTYPES[dtype_name], head_size=head_size,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=block_size,
                             sliding_window=window)
    reasons = backend.validate(config)
    if reasons:
        pytest.skip("; ".join(reasons))
    out, ref = run_case(backend, config, CASES[case], platform.device())
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOLERANCE[config.dtype], f"max abs error {err:.3g} > {TOLERANCE[config.dtype]:.1g}"
