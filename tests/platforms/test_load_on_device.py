"""Weights are created on the device they run on and processed there, after loading: a quantization method sees
the checkpoint's values, in place on the platform's device, when ``process_weights_after_loading`` runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from pagoda.core.config import EngineConfig
from pagoda.core.engine import LLMEngine
from pagoda.core.engine_args import EngineArgs
from pagoda.plugins.hookspecs import hookimpl
from pagoda.plugins.registry import Registry
from pagoda.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod

SEEN: list[tuple[str, torch.device, float]] = []


class RecordingLinearMethod(UnquantizedLinearMethod):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def process_weights_after_loading(self, layer) -> None:
        SEEN.append((self.prefix, layer.weight.device, float(layer.weight.double().abs().sum())))
        super().process_weights_after_loading(layer)


class RecordingConfig(UnquantizedConfig):
    name = "recording"

    def get_linear_method(self, prefix: str):
        return RecordingLinearMethod(prefix)


def _registry() -> Registry:
    module = types.ModuleType("recording_quant_plugin")
    module.pagoda_register_quantization_methods = hookimpl(lambda: [RecordingConfig])
    sys.modules[module.__name__] = module
    return Registry.load(extra_modules={"recording_quant": module})


def _check(model_dir: str, device: str) -> None:
    SEEN.clear()
    args = EngineArgs(model=model_dir, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22,
                      quantization="recording", device=device)
    engine = LLMEngine(EngineConfig.from_engine_args(args, registry=_registry()))
    target = engine.config.platform.device()
    checkpoint = load_file(f"{model_dir}/model.safetensors")
    assert len(SEEN) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
    for prefix, device_seen, total in SEEN:
        assert device_seen.type == target.type, f"{prefix} was processed on {device_seen}, not {target}"
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        module, leaf = prefix.rsplit(".", 1)
        names = [f"{module}.{part}.weight" for part in parts.get(leaf, (leaf,))]
        expected = sum(float(checkpoint[name].double().abs().sum()) for name in names)
        assert total == pytest.approx(expected, rel=1e-6), f"{prefix} was processed before its weights were loaded"


def test_weights_are_processed_on_the_platform_device_after_loading(tiny_model_dir):
    _check(tiny_model_dir("llama"), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weights_are_processed_on_the_gpu_after_loading(tiny_model_dir):
    _check(tiny_model_dir("llama"), "cuda")
