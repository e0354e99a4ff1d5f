"""Builds the model named by the config and fills it with weights.

The model class comes from the registry (by ``architectures``), the per-layer weight storage from the
quantization method, and the tensors from either a Hugging Face directory or a ``CheckpointFormat`` such as
GGUF, which yields Hugging Face names so every model loads every format the same way.

The model is built on the device it runs on, so weights are created where they will live and loaded straight
into place; only then does each quantization method's ``process_weights_after_loading`` run — on that device —
handing the weights to the engine's ops (a GPU format repacks on its GPU, the CPU GEMMs repack in host memory).
With ``--cpu-offload-gb`` the model is built in host memory and placed by the offloader before that step.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pagoda.core.config import EngineConfig
from pagoda.core.model_files import iter_hf_weights
from pagoda.distributed.tensor_parallel import building_model
from pagoda.logger import init_logger
from pagoda.models.causal_pooling import model_class_for_task
from pagoda.ops import current_ops, use_ops

logger = init_logger(__name__)


def load_model(config: EngineConfig) -> nn.Module:
    # layers and quantization methods take their ops from it, MoE layers the expert-parallel setting
    with use_ops(config.ops or current_ops()), building_model(config.parallel):
        return _load_model(config)


def _load_model(config: EngineConfig) -> nn.Module:
    start = time.perf_counter()
    mc = config.model
    registry = config.registry
    architectures = list(getattr(mc.hf_config, "architectures", None) or [])
    if not architectures:
        raise ValueError(f"{mc.path}: config has no 'architectures'; can't tell which model to build")
    model_cls = model_class_for_task(registry, architectures, mc.task)
    quant_config = registry.get_quantization_method(mc.quantization).from_config(mc.quantization_config)
    device = config.platform.device()
    build_device = torch.device("cpu") if config.cpu_offload_gb else device
    with torch.device(build_device):
        model = model_cls(model_config=mc, quant_config=quant_config, attn_backend=config.attention_backend,
                          attn_config=config.attention)
    if mc.load_format == "dummy":
        _fill_dummy(model)
    else:
        weights = (mc.checkpoint_format.iter_weights(mc.weight_file, mc.hf_config) if mc.checkpoint_format
                   else iter_hf_weights(mc.path, mc.load_format))
        loaded = model.load_weights(weights)
        _check_all_loaded(model, loaded, mc.path)
    if config.cpu_offload_gb:
        from pagoda.platforms.offload import offload_parameters  # device platforms only (checked in config)

        # Places the model itself: everything on the device except the offloaded modules' weights.
        offload_parameters(model, int(config.cpu_offload_gb * (1 << 30)), device)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    model.eval()
    logger.info("loaded %s (%s, %s, %s) in %.1f s", mc.model, architectures[0], str(mc.dtype).removeprefix("torch."),
                mc.quantization, time.perf_counter() - start)
    return model


def _check_all_loaded(model: nn.Module, loaded: set[str], path: str) -> None:
    expected = {name for name, p in model.named_parameters()
                if getattr(p, "weight_loader", None) is not None and not getattr(p, "optional_weight", False)}
    expected |= {name for name, b in model.named_buffers() if getattr(b, "weight_loader", None) is not None}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint {path} lacks weights for: {shown}")


@torch.no_grad()
def _fill_dummy(model: nn.Module) -> None:
    """Random weights for benchmarks (``load_format=dummy``): small values so activations stay finite."""
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point:
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.empty(param.shape, dtype=torch.float32).uniform_(-1e-2, 1e-2, generator=generator))


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
