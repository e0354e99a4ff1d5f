"""``--cpu-offload-gb`` helper: which parameters move, that outputs don't change, and the host-memory guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.platforms.cpu import CpuPlatform
from pagoda.platforms.cuda import CudaPlatform
from pagoda.platforms.offload import check_cpu_offload, offload_parameters


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3))
        self.norm = nn.LayerNorm(16)
        self.register_buffer("offset", torch.full((16,), 0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.norm(h) + self.offset


LINEAR_BYTES = (16 * 32 + 32) * 4  # first linear of a layer: weight + bias in fp32


def _model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()


def test_offloads_whole_modules_in_order_until_the_budget():
    model = _model()
    report = offload_parameters(model, device="cpu", offload_bytes=LINEAR_BYTES + 1)
    # The embedding is never a candidate; the first linear fits, the budget is then not yet met, so the next
    # module goes too (whole modules only).
    assert report.offloaded_modules == ["layers.0.0", "layers.0.2"]
    assert report.offloaded_parameters == ["layers.0.0.weight", "layers.0.0.bias", "layers.0.2.weight",
                                           "layers.0.2.bias"]
    assert report.offloaded_bytes == LINEAR_BYTES + (32 * 16 + 16) * 4
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.device_bytes == total - report.offloaded_bytes


def test_zero_budget_offloads_nothing():
    report = offload_parameters(_model(), 0, "cpu")  # positional, as the model loader calls it
    assert report.offloaded_modules == [] and report.offloaded_bytes == 0


def test_outputs_unchanged_and_host_copies_restored():
    reference_model = _model()
    ids = torch.tensor([[1, 5, 7, 2]])
    expected = reference_model(ids)
    model = _model()
    report = offload_parameters(model, device="cpu", offload_bytes=10**9)
    assert len(report.offloaded_modules) == 7  # 6 linears + the norm: everything but the embedding
    host_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    seen_in_forward = {}

    def record(module, args):  # pre-hooks run in registration order: this one after the streaming hook
        seen_in_forward["ptr"] = module.weight.data_ptr()

    hook = model.layers[1][0].register_forward_pre_hook(record)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    hook.remove()
    # During the forward the layer computed with a streamed copy; afterwards it points at its host copy again.
    assert seen_in_forward["ptr"] != host_ptrs["layers.1.0.weight"]
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == host_ptrs
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)  # and again, same result


def test_custom_candidates():
    report = offload_parameters(_model(), device="cpu", offload_bytes=10**9,
                                may_offload=lambda name, module: isinstance(module, nn.LayerNorm))
    assert report.offloaded_modules == ["norm"]


def test_rejected_on_host_memory_platforms():
    with pytest.raises(ValueError, match=r"cpu_offload_gb=2 is only for devices with their own memory; platform "
                                         r"'cpu' already keeps the weights in host memory"):
        check_cpu_offload(CpuPlatform, 2)
    check_cpu_offload(CpuPlatform, 0)
    check_cpu_offload(CudaPlatform, 2)
    with pytest.raises(ValueError, match="cpu_offload_gb must be >= 0, got -1"):
        check_cpu_offload(CudaPlatform, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streams_to_cuda_from_pinned_memory():
    ids = torch.tensor([[1, 5, 7, 2]])
    expected = _model().cuda()(ids.cuda())
    model = _model()
    report = offload_parameters(model, device="cuda", offload_bytes=LINEAR_BYTES)
    assert model.layers[0][0].weight.is_pinned() and model.layers[0][2].weight.is_cuda
    torch.testing.assert_close(model(ids.cuda()), expected)
    assert report.offloaded_modules == ["layers.0.0"]
