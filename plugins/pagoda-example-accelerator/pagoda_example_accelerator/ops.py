"""An op implementation from outside pagoda: RMSNorm written against the ``rms_norm`` op's contract.

It runs on any platform, computes in float32 only, and ranks above pagoda's own implementations, so where it
can run the engine picks it (``pagoda env`` shows the choice); ``--op-impl rms_norm=torch`` puts pagoda's
reference back. It counts its calls so a test can see it ran.
"""

from __future__ import annotations

import torch

from pagoda.ops.interface import OpImpl


class ExampleRmsNorm(OpImpl):
    op = "rms_norm"
    name = "example_rms_norm"
    dtypes = (torch.float32,)
    priority = 50
    calls = 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        type(self).calls += 1
        if residual is not None:
            x = x + residual
            residual = x
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        return out if residual is None else (out, residual)
