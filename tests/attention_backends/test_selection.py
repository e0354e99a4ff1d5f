"""Attention-backend selection: the platform's priority list, VLLM_ATTENTION_BACKEND, and the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pagoda.attention_backends import AttentionConfig, select_attention_backend
from pagoda.platforms.cpu import CpuPlatform
from pagoda.platforms.cuda import CudaPlatform
from pagoda.platforms.tpu import TpuPlatform
from pagoda.plugins.registry import Registry

BUILTIN = ["FLASHINFER", "FLASH_ATTN", "IPEX", "PALLAS", "TORCH_SDPA", "TRITON_ATTN", "XFORMERS"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(allow_list=None)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)


def _config(platform="cpu", dtype=torch.bfloat16, **kw) -> AttentionConfig:
    args = dict(platform=platform, dtype=dtype, head_size=128, num_heads=32, num_kv_heads=8, block_size=16)
    return AttentionConfig(**{**args, **kw})


def test_every_builtin_backend_is_registered(registry):
    assert set(BUILTIN) <= set(registry.attention_backends)
    for name in BUILTIN:
        assert registry.attention_backends[name].name == name


def test_cpu_default_is_torch_sdpa(registry):
    assert select_attention_backend(CpuPlatform, _config(), registry=registry).name == "TORCH_SDPA"


def test_unknown_backend_lists_valid_names(registry, monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "FLASH_ATTN_3")
    with pytest.raises(ValueError) as info:
        select_attention_backend(CpuPlatform, _config(), registry=registry)
    message = str(info.value)
    assert message.startswith("unknown attention backend 'FLASH_ATTN_3'; valid names: ")
    assert all(name in message for name in BUILTIN)


def test_requested_backend_that_cannot_run_gives_reasons(registry, monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "flash_attn")  # names are case-insensitive
    with pytest.raises(ValueError) as info:
        select_attention_backend(CpuPlatform, _config(), registry=registry)
    message = str(info.value)
    assert message.startswith("attention backend FLASH_ATTN was requested but can't run here: ")
    assert "runs on cuda, not cpu" in message and "block size 16 not in [256, 512]" in message
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn is not installed" in message


def test_argument_overrides_environment(registry, monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "XFORMERS")
    assert select_attention_backend(CpuPlatform, _config(), requested="TORCH_SDPA",
                                    registry=registry).name == "TORCH_SDPA"


def test_triton_on_cpu_needs_the_interpreter(registry, monkeypatch):
    backend = registry.attention_backends["TRITON_ATTN"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backend.validate(_config())
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = [] if importlib.util.find_spec("triton") else ["triton is not installed: pip install pagoda-llm[cuda]"]
    assert backend.validate(_config()) == expected


def test_cuda_priority_list_falls_through_to_what_can_run(registry):
    # Checked against the CUDA platform's list whatever this machine has: each backend decides from the config
    # and from what is installed, so the first one able to run here is chosen and the others' reasons are logged.
    config = _config("cuda", block_size=16)
    chosen = select_attention_backend(CudaPlatform, config, registry=registry)
    for name in CudaPlatform.attention_backends:
        if name == chosen.name:
            break
        assert registry.attention_backends[name].validate(config), f"{name} could run but was skipped"
    assert chosen.validate(config) == []
    # flash-attn's paged kernel needs blocks of 256: with 16 it is never chosen.
    assert chosen.name != "FLASH_ATTN"


def test_no_backend_can_run_names_every_reason(registry):
    # float16 on TPU: PALLAS refuses it (and torch_xla is missing here); TORCH_SDPA takes any dtype, so use an
    # uneven head split that every backend rejects.
    config = _config("tpu", dtype=torch.float16, num_heads=6, num_kv_heads=4)
    with pytest.raises(RuntimeError) as info:
        select_attention_backend(TpuPlatform, config, registry=registry)
    message = str(info.value)
    assert message.startswith("no attention backend of platform tpu can run this model: PALLAS: ")
    assert "TORCH_SDPA: num_heads 6 is not a multiple of num_kv_heads 4" in message


@pytest.mark.parametrize("name", BUILTIN)
def test_describe_and_cache_shape(registry, name):
    backend = registry.attention_backends[name]
    facts = backend.describe()
    assert facts["name"] == name
    shape = backend.kv_cache_shape(10, 16, 4, 64)
    assert torch.Size(shape).numel() == 2 * 10 * 16 * 4 * 64  # keys and values of every slot, nothing more
    assert shape[1] == 10  # blocks on dimension 1: the engine copies blocks as cache[:, dst] = cache[:, src]
