"""The CUDA, ROCm, TPU and XPU platforms: registration, descriptors, and their probes and error paths on a
machine that may have none of those devices (the assertions follow what this torch build actually has)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pagoda.platforms import resolve_platform
from pagoda.platforms.cpu import CpuPlatform
from pagoda.ops.interface import OpImpl
from pagoda.platforms.cuda import CudaPlatform, sm_capabilities
from pagoda.platforms.rocm import RocmPlatform
from pagoda.platforms.tpu import TpuPlatform
from pagoda.platforms.xpu import XpuPlatform
from pagoda.plugins.registry import Registry

DEVICE_PLATFORMS = [CudaPlatform, RocmPlatform, TpuPlatform, XpuPlatform]
HAS_CUDA = bool(torch.version.cuda) and torch.cuda.is_available()
HAS_HIP = bool(torch.version.hip) and torch.cuda.is_available()
HAS_XPU = getattr(torch._C, "_has_xpu", False) and torch.xpu.is_available()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(allow_list=None)


def test_all_registered_through_entry_points(registry):
    for cls in DEVICE_PLATFORMS:
        assert registry.platforms[cls.name] is cls
        assert registry.owner_of("platform", cls.name) == cls.name
        assert next(p for p in registry.plugins if p.name == cls.name).distribution == "pagoda-llm"


@pytest.mark.parametrize("cls", DEVICE_PLATFORMS, ids=lambda c: c.name)
def test_descriptors(cls):
    assert cls.priority > CpuPlatform.priority  # an accelerator, when present, wins over the host
    assert not cls.uses_host_memory
    assert cls.attention_backends[-1] == "TORCH_SDPA"  # the portable fallback comes last
    facts = cls.describe()
    assert facts["name"] == cls.name and facts["dist_backend"] == cls.dist_backend
    assert torch.bfloat16 in cls.supported_dtypes


def test_device_types_and_dist_backends():
    assert [(c.device_type, c.dispatch_key, c.dist_backend) for c in (CudaPlatform, RocmPlatform, TpuPlatform)] == [
        ("cuda", "CUDA", "nccl"), ("cuda", "CUDA", "nccl"), ("xla", "XLA", "xla")]
    assert (XpuPlatform.device_type, XpuPlatform.dispatch_key) == ("xpu", "XPU")
    assert XpuPlatform.dist_backend in ("xccl", "ccl")
    assert CudaPlatform.attention_backends[:3] == ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
    assert RocmPlatform.attention_backends[0] == "TRITON_ATTN"
    assert TpuPlatform.attention_backends[0] == "PALLAS" and XpuPlatform.attention_backends[0] == "IPEX"


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_cuda_reason_here():
    reason = CudaPlatform.unavailable_reason()
    assert reason is not None and torch.__version__ in reason
    if torch.version.hip:
        assert "rocm platform" in reason
    elif not torch.version.cuda:
        assert "pip install pagoda-llm[cuda]" in reason
    else:
        assert "no CUDA device found" in reason


def test_sm_capabilities_mean_that_level_or_newer():
    assert {"sm_70", "sm_80", "sm_86"} <= sm_capabilities(86) and "sm_89" not in sm_capabilities(86)
    assert {"sm_80", "sm_90"} <= sm_capabilities(90) and "sm_100" not in sm_capabilities(90)
    assert "sm_87" in sm_capabilities(87)  # a level outside the list still names itself


class _NeedsHopper(OpImpl):
    op, name, platforms, requires = "rms_norm", "needs_sm90", ("cuda",), ("sm_90",)


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_an_op_requiring_a_compute_capability_is_refused_with_its_reason_here():
    assert CudaPlatform.capabilities() == frozenset()
    reason = _NeedsHopper.unavailable_reason(CudaPlatform, torch.bfloat16)
    assert reason is not None and "sm_90" in reason


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_reports_its_compute_capability():
    major, minor = torch.cuda.get_device_capability(0)
    caps = CudaPlatform.capabilities()
    assert f"sm_{10 * major + minor}" in caps and "sm_70" in caps
    assert (_NeedsHopper.unavailable_reason(CudaPlatform, torch.bfloat16) is None) == (major >= 9)


@pytest.mark.skipif(HAS_HIP, reason="an AMD GPU is present")
def test_rocm_reason_here():
    reason = RocmPlatform.unavailable_reason()
    assert reason is not None
    assert ("pip install pagoda-llm[rocm]" in reason) if not torch.version.hip else ("no AMD GPU" in reason)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
def test_tpu_reason_without_torch_xla():
    assert TpuPlatform.unavailable_reason() == "torch_xla is not installed: pip install pagoda-llm[tpu]"


@pytest.mark.skipif(HAS_XPU, reason="an Intel GPU is present")
def test_xpu_reason_here():
    reason = XpuPlatform.unavailable_reason()
    assert reason is not None
    if not getattr(torch._C, "_has_xpu", False):
        assert "has no XPU support" in reason and "pip install pagoda-llm[xpu]" in reason


@pytest.mark.parametrize("cls", DEVICE_PLATFORMS, ids=lambda c: c.name)
def test_requesting_an_unavailable_device_names_the_reason(cls, registry):
    reason = cls.unavailable_reason()
    if reason is None:
        pytest.skip(f"{cls.name} is available here")
    with pytest.raises(RuntimeError, match=rf"device '{cls.name}' was requested but platform '{cls.name}' cannot run"
                                           rf" here: .+") as info:
        resolve_platform(cls.name, registry)
    assert reason in str(info.value)


def test_auto_picks_an_available_platform_by_priority(registry):
    chosen = resolve_platform("auto", registry)
    available = [p for p in registry.platforms.values() if p.is_available()]
    assert chosen.is_available()
    assert chosen.priority == max(p.priority for p in available)
    if not (HAS_CUDA or HAS_HIP or HAS_XPU or TpuPlatform.is_available()):
        assert chosen is CpuPlatform


def test_unknown_device_lists_registered_platforms(registry):
    with pytest.raises(ValueError, match=r"unknown device 'npu'; registered platforms: cpu, cuda, rocm, tpu, xpu"):
        resolve_platform("npu", registry)


def test_cuda_default_dtype_falls_back_to_fp16_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert CudaPlatform.default_dtype(torch.float32) == torch.float16
    assert CudaPlatform.default_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert CudaPlatform.default_dtype(torch.float32) == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_memory_queries_and_budget():
    total, free = CudaPlatform.total_memory_bytes(), CudaPlatform.free_memory_bytes()
    assert 0 < free <= total
    budget = CudaPlatform.kv_cache_budget_bytes(gpu_memory_utilization=0.5, cpu_kvcache_space_gib=None,
                                                model_bytes=1 << 20)
    assert budget == int(total * 0.5) - (1 << 20)
    CudaPlatform.seed_everything(3)
    a = torch.randn(4, device="cuda")
    CudaPlatform.seed_everything(3)
    assert torch.equal(a, torch.randn(4, device="cuda"))
