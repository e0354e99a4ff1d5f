"""Every registered attention backend against a float64 reference over hand-built paged batches.

Backends that can't run here skip with the reasons their ``validate`` gives (the end-of-run summary lists
them). Shapes are tiny so the whole matrix, Triton interpreter included, stays fast on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.attention_backends.attn_cases import CASES, TOLERANCE, run_layers
from pagoda.attention_backends.interface import AttentionConfig
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import get_registry

REGISTRY = get_registry()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = {"gqa": (8, 2), "mha": (4, 4), "mqa": (32, 1)}
MAIN_CASES = [c for c in CASES if c != "long"]
SOFT_CAP = 2.0  # small enough to change random q.k logits of unit scale


def _block_sizes(backend) -> list[int]:
    """16 and 32, or the backend's two smallest block sizes when it takes neither (flash-attn's paged kernel
    wants multiples of 256), so every backend runs the full matrix somewhere."""
    declared = backend.block_sizes
    usual = [b for b in (16, 32) if declared is None or b in declared]
    return usual or sorted(declared)[:2]


def _params(backend) -> list[tuple]:
    """The full cross product of case x heads x block size x dtype at head size 64 (or the backend's smallest);
    then the other head sizes on the case that exercises every path at once (decodes + prefills with context);
    then sliding windows, long sequences (several query tiles), and 32 query heads on one KV head; then soft-capped
    logits (Gemma 2) and layers of different windows on one step's metadata (``"mixed"``: a window of 8 and a
    global layer, as Gemma 2/3 interleave them)."""
    bsizes = _block_sizes(backend)
    base = 64 if backend.head_sizes is None or 64 in backend.head_sizes else min(backend.head_sizes)
    params = [(case, heads, base, bs, dt, None, None) for case in MAIN_CASES for heads in ("gqa", "mha")
              for bs in bsizes for dt in DTYPES]
    params += [("mixed", "gqa", hs, bsizes[0], dt, None, None) for hs in (80, 128, 256) if hs != base
               for dt in ("fp32", "bf16")]
    params += [(case, "gqa", base, bsizes[0], "fp32", 8, None) for case in ("chunked", "mixed")]
    params += [("long", "gqa", base, bsizes[0], "bf16", None, None),
               ("mixed", "mqa", base, bsizes[0], "fp16", None, None)]
    params += [("mixed", "gqa", base, bsizes[0], dt, None, SOFT_CAP) for dt in ("fp32", "bf16")]
    params += [("chunked", "gqa", base, bsizes[0], "fp32", 8, SOFT_CAP)]
    params += [(case, "gqa", base, bsizes[0], "fp32", "mixed", None) for case in ("chunked", "mixed")]
    params += [("long", "gqa", base, bsizes[0], "bf16", "mixed", SOFT_CAP)]
    return [(backend.name, *p) for p in params]


def _id(p):
    name, case, heads, hs, bs, dt, window, cap = p
    return (f"{name}-{case}-{heads}-d{hs}-b{bs}-{dt}" + (f"-sw{window}" if window else "")
            + (f"-cap{cap:g}" if cap else ""))


PARAMS = [p for name in sorted(REGISTRY.attention_backends) for p in _params(REGISTRY.attention_backends[name])]


@pytest.fixture(scope="module")
def platform():
    return resolve_platform("auto")


@pytest.mark.parametrize("params", PARAMS, ids=[_id(p) for p in PARAMS])
def test_backend_matrix(params, platform):
    backend_name, case, heads, head_size, block_size, dtype_name, window, cap = params
    num_heads, num_kv_heads = HEADS[heads]
    backend = REGISTRY.attention_backends[backend_name]
    mixed = window == "mixed"
    config = AttentionConfig(platform=platform.name, dtype=DTYPES[dtype_name], head_size=head_size,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=block_size,
                             sliding_window=8 if mixed else window, layer_windows=(8, None) if mixed else None,
                             logits_soft_cap=cap)
    reasons = backend.validate(config)
    if reasons:
        pytest.skip("; ".join(reasons))
    for layer_window, (out, ref) in run_layers(backend, config, CASES[case], platform.device()).items():
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        err = (out.double() - ref).abs().max().item()
        assert err <= TOLERANCE[config.dtype], (f"window {layer_window}: max abs error {err:.3g} > "
                                                f"{TOLERANCE[config.dtype]:.1g}")
