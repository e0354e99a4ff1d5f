"""Every registered implementation of every op against the op's torch reference, over a shape matrix.

Implementations this machine can run (for the resolved platform and the dtype) run; the others skip with the
registry's reason — the same suite runs on a laptop, in CI and on a GPU. The references themselves are checked
against float64 maths of the same formulas, so a wrong reference fails here too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.ops import OPS
from pagoda.ops.reference import rotate
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import get_registry
from tests.ops import lora_op_cases, moe_op_cases, op_cases, quant_op_cases

REGISTRY = get_registry()
PLATFORM = resolve_platform("auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {**op_cases.CASES, **quant_op_cases.CASES, **lora_op_cases.CASES, **moe_op_cases.CASES}
IMPLS = [(op, name) for op in sorted(REGISTRY.ops) for name in sorted(REGISTRY.ops[op])]


def _impl(op: str, name: str, dtype: torch.dtype):
    cls = REGISTRY.ops[op][name]
    reason = cls.unavailable_reason(PLATFORM, dtype)
    if reason is not None:
        pytest.skip(f"{op}/{name} on {PLATFORM.name}: {reason}")
    return cls(), REGISTRY.ops[op]["torch"]()


def test_every_op_has_a_reference_and_only_known_ops_are_registered():
    assert set(REGISTRY.ops) == set(OPS)
    for op, impls in REGISTRY.ops.items():
        assert impls["torch"].is_reference, op
        assert sum(c.is_reference for c in impls.values()) == 1, op


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("op,name", IMPLS, ids=[f"{op}-{name}" for op, name in IMPLS])
def test_op_matches_reference(op, name, dtype):
    impl, ref = _impl(op, name, DTYPES[dtype])
    for case in CASES[op]:
        case(impl, ref, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_references_match_float64_maths(dtype):
    """The reference implementations compute what their op says (float64 of the same formula)."""
    dt = DTYPES[dtype]
    tol = op_cases.TOL[dt]
    ops = {op: REGISTRY.ops[op]["torch"]() for op in REGISTRY.ops}
    g = torch.Generator().manual_seed(0)
    x, res, w = (torch.randn(5, 48, generator=g).to(dt) for _ in range(3))
    out, summed = ops["rms_norm"](x, w[0], 1e-6, res)
    s64 = x.double() + res.double()
    torch.testing.assert_close(out.double(), s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6)
                               * w[0].double(), **tol)
    out, _ = ops["layer_norm"](x, w[0], w[1], 1e-5, res)
    centred = s64 - s64.mean(-1, keepdim=True)
    torch.testing.assert_close(out.double(), centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
                               * w[0].double() + w[1].double(), **tol)
    y = torch.randn(3, 20, generator=g).to(dt)
    torch.testing.assert_close(ops["activation"](y, "relu").double(), y.double().clamp(min=0), **tol)
    cube = y.double() + 0.044715 * y.double() ** 3  # the tanh approximation, written out
    torch.testing.assert_close(ops["activation"](y, "gelu_tanh").double(),
                               0.5 * y.double() * (1 + torch.tanh((2 / torch.pi) ** 0.5 * cube)), **tol)
    gate, up = y.double().chunk(2, -1)
    torch.testing.assert_close(ops["silu_and_mul"](y).double(), F.silu(gate) * up, **tol)
    torch.testing.assert_close(ops["gelu_and_mul"](y, "tanh").double(), F.gelu(gate, approximate="tanh") * up, **tol)
    wl = torch.randn(7, 48, generator=g).to(dt)
    handle = ops["linear_dense"].prepare(wl, None)
    torch.testing.assert_close(ops["linear_dense"].apply(handle, x).double(), x.double() @ wl.double().T, **tol)
    # rotate-half with the sign folded into sin equals the textbook rotation
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    angle = torch.rand(2, 4, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([-angle.sin(), angle.sin()], -1)
    q1, q2 = q.chunk(2, -1)
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    torch.testing.assert_close(rotate(q, cos[:, None], sin[:, None]), torch.cat([q1 * c - q2 * s, q2 * c + q1 * s], -1))
    quant_op_cases.references_match_float64(ops, dt)
