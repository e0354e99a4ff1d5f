"""The example out-of-tree distributions in plugins/, installed with pip and discovered through entry points."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from pagoda.attention_backends import AttentionConfig, select_attention_backend
from pagoda.platforms import resolve_platform
from tests.attention_backends.attn_cases import CASES, TOLERANCE, run_case


def _config(platform: str, dtype=torch.float32) -> AttentionConfig:
    return AttentionConfig(platform=platform, dtype=dtype, head_size=64, num_heads=8, num_kv_heads=2, block_size=16)


def test_discovered_with_distribution_and_contributions(load_registry):
    registry = load_registry()
    records = {p.name: p for p in registry.plugins}
    example = records["example_accelerator"]
    assert (example.status, example.distribution, example.version) == ("loaded", "pagoda-example-accelerator", "0.1.0")
    assert example.provides == ["platform:example", "attention_backend:EXAMPLE_ATTN",
                                "quantization_method:example_int8", "op:rms_norm:example_rms_norm"]
    assert records["example_npu"].provides == ["platform:example_npu"]
    assert registry.owner_of("attention_backend", "EXAMPLE_ATTN") == "example_accelerator"


def test_broken_plugin_is_reported_by_name_and_spares_the_others(load_registry, caplog):
    with caplog.at_level(logging.ERROR, logger="pagoda"):
        logging.getLogger("pagoda").propagate = True  # let caplog see the pagoda logger's records
        try:
            registry = load_registry()
        finally:
            logging.getLogger("pagoda").propagate = False
    broken = next(p for p in registry.plugins if p.name == "broken_example")
    assert broken.status == "failed"
    assert broken.distribution == "pagoda-broken-plugin"
    assert broken.error.startswith("ImportError: pagoda-broken-plugin fails to import on purpose")
    assert any("broken_example" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert {"cpu", "example", "example_npu"} <= set(registry.platforms)
    assert all(p.status == "loaded" for p in registry.plugins if p.name != "broken_example")


def test_installing_plugins_keeps_cpu_as_default(load_registry):
    assert resolve_platform("auto", load_registry()).name == "cpu"


def test_several_out_of_tree_platforms_resolve_deterministically(load_registry, monkeypatch):
    monkeypatch.setenv("PAGODA_EXAMPLE_PRIORITY", "50")
    assert resolve_platform("auto", load_registry()).name == "example"
    # Equal priorities: the name that sorts first wins, every time.
    monkeypatch.setenv("PAGODA_EXAMPLE_NPU_PRIORITY", "50")
    assert {resolve_platform("auto", load_registry()).name for _ in range(3)} == {"example"}
    monkeypatch.setenv("PAGODA_EXAMPLE_NPU_PRIORITY", "60")
    assert resolve_platform("auto", load_registry()).name == "example_npu"
    # An unavailable platform never wins, whatever its priority.
    monkeypatch.setenv("PAGODA_EXAMPLE_PRIORITY", "99")
    monkeypatch.setenv("PAGODA_EXAMPLE_UNAVAILABLE", "1")
    assert resolve_platform("auto", load_registry()).name == "example_npu"
    with pytest.raises(RuntimeError, match="PAGODA_EXAMPLE_UNAVAILABLE=1"):
        resolve_platform("example", load_registry())


def test_example_platform_prefers_its_backend(load_registry, monkeypatch):
    monkeypatch.setenv("PAGODA_EXAMPLE_PRIORITY", "50")
    registry = load_registry()
    platform = resolve_platform("auto", registry)
    assert select_attention_backend(platform, _config("example"), registry=registry).name == "EXAMPLE_ATTN"


def test_attention_backend_env_var_selects_plugin_backend(load_registry, monkeypatch):
    registry = load_registry()
    cpu = registry.platforms["cpu"]
    assert select_attention_backend(cpu, _config("cpu"), registry=registry).name == "TORCH_SDPA"
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "EXAMPLE_ATTN")
    assert select_attention_backend(cpu, _config("cpu"), registry=registry).name == "EXAMPLE_ATTN"


def test_vllm_plugins_excludes_a_plugin(load_registry, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "cpu,torch_sdpa,unquantized")
    registry = load_registry()
    records = {p.name: p for p in registry.plugins}
    assert records["example_accelerator"].status == "excluded"
    assert records["broken_example"].status == "excluded"  # excluded plugins are never imported
    assert "EXAMPLE_ATTN" not in registry.attention_backends and "example" not in registry.platforms
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "EXAMPLE_ATTN")
    with pytest.raises(ValueError, match=r"unknown attention backend 'EXAMPLE_ATTN'; valid names: TORCH_SDPA"):
        select_attention_backend(registry.platforms["cpu"], _config("cpu"), registry=registry)


@pytest.mark.parametrize("case", ["prefill", "prefix_hit", "chunked", "decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_example_attention_matches_reference(load_registry, case, dtype):
    backend = load_registry().attention_backends["EXAMPLE_ATTN"]
    config = _config("cpu", dtype)
    assert backend.validate(config) == []
    out, ref = run_case(backend, config, CASES[case], torch.device("cpu"))
    assert (out.double() - ref).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_example_int8_quantizes_dense_weights_at_load(load_registry, dtype):
    from torch import nn

    config_cls = load_registry().get_quantization_method("example_int8")
    method = config_cls.from_config({}).get_linear_method("model.layers.0.self_attn.qkv_proj")
    layer = nn.Module()
    method.create_weights(layer, 64, [32, 16, 16], bias=True, params_dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    shards = [torch.randn(n, 64, generator=gen).to(dtype) for n in (32, 16, 16)]
    for shard_id, shard in enumerate(shards):
        layer.weight.weight_loader(layer.weight, shard, shard_id)
    bias = torch.randn(64, generator=gen).to(dtype)
    layer.bias.weight_loader(layer.bias, bias)
    dense = torch.cat(shards)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight") or "weight" not in layer._parameters
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (64, 64)
    # Per-channel int8 error: each weight is within half a step of its channel's scale.
    dequant = layer.qweight.float() * layer.scale[:, None]
    assert ((dequant - dense.float()).abs() <= layer.scale[:, None] / 2 + 1e-6).all()
    x = torch.randn(5, 64, generator=gen).to(dtype)
    expected = x.double() @ dequant.double().T + bias.double()
    # bfloat16 keeps 8 significant bits: allow a few of its steps at the output's magnitude.
    tol = 1e-4 if dtype == torch.float32 else 4 * 2 ** -8 * expected.abs().max().item()
    assert (method.apply(layer, x).double() - expected).abs().max() <= tol


def test_pagoda_env_reports_every_plugin(with_plugins):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(with_plugins), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "env"]
    text = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "broken_example" in text.stdout and "fails to import on purpose" in text.stdout
    assert "example_accelerator loaded" in text.stdout
    assert "Platform: cpu" in text.stdout
    facts = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env,
                                      timeout=120).stdout)
    plugins = {p["name"]: p for p in facts["plugins"]}
    assert plugins["broken_example"]["status"] == "failed"
    assert plugins["broken_example"]["distribution"] == "pagoda-broken-plugin"
    assert plugins["example_accelerator"]["provides"] == ["platform:example", "attention_backend:EXAMPLE_ATTN",
                                                          "quantization_method:example_int8",
                                                          "op:rms_norm:example_rms_norm"]
    backends = {b["name"]: b for b in facts["attention_backends"]}
    assert backends["EXAMPLE_ATTN"]["status"] == "ok" and facts["attention_backend"] == "TORCH_SDPA"
    quant = {q["name"]: q for q in facts["quantization_methods"]}
    assert quant["example_int8"]["status"] == "ok"
