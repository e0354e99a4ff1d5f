"""``pagoda env``: text and JSON reports of platforms, backends, quantization methods, plugins and packages."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.entrypoints.cli import main
from pagoda.platforms.cuda import CudaPlatform
from pagoda.plugins.registry import reset_registry

DEVICE_PLATFORMS = ("cuda", "rocm", "tpu", "xpu")


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    for name in ("VLLM_PLUGINS", "VLLM_ATTENTION_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    reset_registry()
    yield
    reset_registry()


def _json(capsys, *argv) -> dict:
    assert main(["env", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report(capsys):
    facts = _json(capsys)
    platforms = {p["name"]: p for p in facts["platforms"]}
    assert {"cpu", *DEVICE_PLATFORMS} <= set(platforms)
    assert platforms["cpu"]["status"] == "available" and platforms["cpu"]["plugin"] == "cpu"
    for name in DEVICE_PLATFORMS:
        p = platforms[name]
        assert (p["status"] == "available") == (p["reason"] is None)
    backends = {b["name"]: b for b in facts["attention_backends"]}
    assert facts["attention_backend"] in backends and backends[facts["attention_backend"]]["status"] == "ok"
    assert all(b["reasons"] for b in backends.values() if b["status"] == "unusable")
    plugins = {p["name"]: p for p in facts["plugins"]}
    assert plugins["triton_attn"] == {"name": "triton_attn", "value": "pagoda.attention_backends.triton_attn",
                                      "distribution": "pagoda-llm", "version": plugins["triton_attn"]["version"],
                                      "status": "loaded", "error": None, "provides": ["attention_backend:TRITON_ATTN"]}
    assert facts["packages"]["torch"] == torch.__version__
    assert "none" in {q["name"] for q in facts["quantization_methods"]}


def test_backend_checks_follow_the_arguments(capsys):
    facts = _json(capsys, "--device", "cpu", "--dtype", "float32", "--head-size", "64", "--block-size", "32")
    assert facts["attention_config"] == {"platform": "cpu", "dtype": "float32", "head_size": 64, "num_heads": 32,
                                         "num_kv_heads": 8, "block_size": 32}
    assert facts["attention_backend"] == "TORCH_SDPA"
    flash = next(b for b in facts["attention_backends"] if b["name"] == "FLASH_ATTN")
    assert "block size 32 not in [256, 512]" in flash["reasons"]
    assert "dtype float32 not in ['float16', 'bfloat16']" in flash["reasons"]


def test_unavailable_device_is_reported_not_raised(capsys):
    if CudaPlatform.is_available():
        pytest.skip("CUDA is usable here")
    facts = _json(capsys, "--device", "cuda")
    assert facts["platform"] is None
    assert facts["platform_error"].startswith("device 'cuda' was requested but platform 'cuda' cannot run here")


def test_excluded_plugins_are_listed(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "cpu,torch_sdpa,unquantized")
    facts = _json(capsys)
    statuses = {p["name"]: p["status"] for p in facts["plugins"]}
    assert statuses["cpu"] == "loaded" and statuses["cuda"] == "excluded" and statuses["triton_attn"] == "excluded"
    assert facts["plugin_allow_list"] == ["cpu", "torch_sdpa", "unquantized"]
    assert [b["name"] for b in facts["attention_backends"]] == ["TORCH_SDPA"]


def test_text_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "Platform: cpu" in out
    assert "  cuda         priority  100  " in out
    assert " *TORCH_SDPA   ok" in out
    assert "  triton_attn    loaded   pagoda.attention_backends.triton_attn  [pagoda-llm " in out
    assert "Packages:" in out and f"  torch                        {torch.__version__}" in out


def test_native_cpu_kernels_and_op_choices_are_reported(capsys, monkeypatch):
    from pagoda.platforms.cpu.kernels import cpu

    facts = _json(capsys)
    cpu_platform = next(p for p in facts["platforms"] if p["name"] == "cpu")
    assert cpu_platform["native_kernels"].startswith("built" if cpu.kernels() is not None else "unavailable")
    choices = {c["op"]: c for c in facts["ops"]["choices"]}
    assert set(choices) >= {"rms_norm", "linear_dense", "paged_decode_attention", "prefill_attention", "write_kv"}
    for choice in choices.values():  # every implementation is either chosen or passed over with a reason
        assert all(other["reason"] for other in choice["passed_over"])
    monkeypatch.setenv("PAGODA_CPU_KERNELS", "0")
    cpu.reset_for_tests()
    try:
        assert main(["env"]) == 0
        out = capsys.readouterr().out
        assert "native kernels: unavailable: disabled by PAGODA_CPU_KERNELS=0" in out
        assert "  rms_norm                 torch" in out
        assert "not cpu_native: native CPU kernels unavailable: disabled by PAGODA_CPU_KERNELS=0" in out
        # A forced implementation that can't run is an error with its reason, in the report too.
        assert main(["env", "--op-impl", "rms_norm=cpu_native"]) == 0
        assert "op_impl: rms_norm=cpu_native can't run on platform cpu" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        cpu.reset_for_tests()


def test_every_quantization_method_is_listed_with_why_it_cannot_run(capsys, monkeypatch):
    methods = {q["name"]: q for q in _json(capsys)["quantization_methods"]}
    assert {"none", "gguf", "awq", "gptq", "fp8", "compressed-tensors", "aqlm"} <= set(methods)
    assert all(q["status"] == "ok" and q["reason"] is None for q in methods.values())
    from pagoda.platforms.cpu import CpuPlatform

    monkeypatch.setattr(CpuPlatform, "supported_quantization", ("none", "gguf"))
    methods = {q["name"]: q for q in _json(capsys, "--device", "cpu")["quantization_methods"]}
    assert methods["gguf"]["status"] == "ok"
    assert methods["awq"] == {"name": "awq", "status": "unusable", "plugin": methods["awq"]["plugin"],
                              "reason": "platform cpu supports none, gguf only, not awq"}
    assert main(["env", "--device", "cpu"]) == 0
    assert "aqlm         unusable: platform cpu supports none, gguf only, not aqlm" in capsys.readouterr().out
