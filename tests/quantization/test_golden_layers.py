"""Single layers of real quantized checkpoints against the outputs vLLM's CUDA kernels gave for them.

``shared/golden/quant`` holds each layer's tensors, an input and vLLM's output (see its README for provenance).
The layer is built by the registered quantization method from the checkpoint's ``quantization_config`` and run
with the reference ops and with the ops this platform selects, in float32 and bf16. Tolerances are relative
Frobenius errors of the output, from that README: a plain float32 dequantize-and-matmul lands at 3e-4 (AWQ,
GPTQ) to 2.4e-3 (FP8 blocks, WNA16); bf16 activations add about 3e-3. The two static-FP8 references agree with any
reading of their scales only to ~1.2e-2. The INT8 reference ran vLLM's bf16 fallback (weights only), so our
per-token INT8 activations add their own rounding (~8e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pagoda.models.layers import Linear
from pagoda.ops import reference_ops, select_ops, use_ops
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import get_registry

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "quant"
TOLERANCE = {
    "awq_linear": 1e-3, "gptq_linear": 1e-3, "fp8_linear": 5e-3, "compressed_tensors_linear_wna16": 5e-3,
    "compressed_tensors_linear_w8a8fp8": 5e-3, "compressed_tensors_linear_w8a8fp8_static_per_tensor": 2e-2,
    "compressed_tensors_linear_w8a8fp8_static_per_channel": 2e-2,
    "compressed_tensors_linear_w8a8int8_bf16fallback_static_per_channel": 1.5e-2,
}
BF16_EXTRA = 4e-3
NAMES = sorted(TOLERANCE)

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden layers not found at {GOLDEN}")


def run_layer(name: str, dtype: torch.dtype, ops, tensors: dict | None = None,
              config_changes: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, Linear]:
    config = {**json.loads((GOLDEN / f"{name}.config.json").read_text()), **(config_changes or {})}
    tensors = dict(tensors or load_file(str(GOLDEN / f"{name}.safetensors")))
    x, ref = tensors.pop("input"), tensors.pop("ref_output")
    x, ref = x.reshape(-1, x.shape[-1]), ref.reshape(-1, ref.shape[-1])
    method = get_registry().get_quantization_method(config["quant_method"]).from_config(config)
    with use_ops(ops):
        layer = Linear(x.shape[-1], [ref.shape[-1]], False, method, "model.layers.0.mlp.down_proj", dtype)
        for key, value in tensors.items():
            param = getattr(layer, key)
            param.weight_loader(param, value)
        layer.quant_method.process_weights_after_loading(layer)
        out = layer(x.to(dtype)).float()
    return out, ref.float(), layer


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("ops", ["reference", "selected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_golden_layer(name, dtype, ops):
    op_set = reference_ops() if ops == "reference" else select_ops(resolve_platform(), dtype)
    out, ref, _ = run_layer(name, dtype, op_set)
    limit = TOLERANCE[name] + (BF16_EXTRA if dtype == torch.bfloat16 else 0)
    err = rel_error(out, ref)
    assert err <= limit, f"{name} ({ops} ops, {dtype}): relative error {err:.2e} > {limit:.1e}"


def test_negative_controls_fail():
    """The tolerances catch packing mistakes: AWQ read in sequential nibble order, GPTQ without its +1 zero."""
    from pagoda.quantization import packing

    tensors = load_file(str(GOLDEN / "awq_linear.safetensors"))
    sequential = dict(tensors)
    codes = packing.unpack_int32(tensors["qweight"], 4, -1).unflatten(-1, (-1, 8))  # nibbles as columns
    reordered = codes[..., list(packing.AWQ_ORDER)].flatten(-2)  # so unpack_awq reads them back sequentially
    sequential["qweight"] = _pack_last(reordered)
    out, ref, _ = run_layer("awq_linear", torch.float32, reference_ops(), sequential)
    assert rel_error(out, ref) > 10 * TOLERANCE["awq_linear"]

    # gptq_v2 reads the stored zeros as they are: the original format's zero - 1 then goes uncorrected.
    out, ref, _ = run_layer("gptq_linear", torch.float32, reference_ops(), config_changes={"checkpoint_format":
                                                                                           "gptq_v2"})
    assert rel_error(out, ref) > 10 * TOLERANCE["gptq_linear"]


def _pack_last(codes: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return (codes.to(torch.int64).unflatten(-1, (-1, 8)) << shifts).sum(-1).to(torch.int64).to(torch.int32)
