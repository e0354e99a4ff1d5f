"""``--cpu-offload-gb``: keep part of the weights in host memory and stream them to the device every forward.

This trades speed for capacity, as vLLM's option of the same name does: a model that is a few GiB too large for
the device still runs, each offloaded layer's weights crossing the host link on every step. The model loader
calls :func:`check_cpu_offload` and then :func:`offload_parameters` once the weights are loaded.

Granularity is the module: walking the model in definition order, each module that owns parameters directly is
offloaded whole while the offloaded total is below the budget (so the last one may overshoot by one module,
which keeps every layer's weights either all local or all streamed). Offloaded parameters live in pinned host
memory so the copies are asynchronous; a forward pre-hook points the parameters at a device copy and a forward
hook points them back at the host copy, so the device copy is freed as soon as the module is done with it.
Quantization methods need no change: they read ``layer.weight`` inside the module's forward as usual.

Only parameters read inside their own module's ``forward`` can be streamed this way. Embedding tables are
kept on the device by default because a tied LM head reads the table outside the embedding's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pagoda.platforms.interface import Platform


@dataclass
class OffloadReport:
    """What :func:`offload_parameters` did."""

    offloaded_bytes: int = 0
    offloaded_modules: list[str] = field(default_factory=list)
    offloaded_parameters: list[str] = field(default_factory=list)
    device_bytes: int = 0


def check_cpu_offload(platform: type[Platform], offload_gb: float) -> None:
    """Raise ``ValueError`` if ``--cpu-offload-gb offload_gb`` makes no sense on ``platform``."""
    if offload_gb < 0:
        raise ValueError(f"cpu_offload_gb must be >= 0, got {offload_gb}")
    if offload_gb > 0 and platform.uses_host_memory:
        raise ValueError(f"cpu_offload_gb={offload_gb} is only for devices with their own memory; platform "
                         f"{platform.name!r} already keeps the weights in host memory (use 0)")


def _param_bytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _not_embedding(name: str, module: nn.Module) -> bool:
    return not (isinstance(module, nn.Embedding) or name.endswith(("embed_tokens", "lm_head", "wte")))


def offload_parameters(model: nn.Module, offload_bytes: int, device: torch.device | str,
                       pin_memory: bool | None = None,
                       may_offload: Callable[[str, nn.Module], bool] = _not_embedding) -> OffloadReport:
    """Move ``model`` to ``device`` except about ``offload_bytes`` of parameters, which stay on the host.

    ``model`` is expected on the host, and this call replaces ``model.to(device)``: moving the model afterwards
    would bring the offloaded parameters to the device too (and loading the whole model onto the device first is
    what offloading exists to avoid). ``pin_memory`` defaults to "when ``device`` is not the CPU" (pinning
    needs an accelerator). ``may_offload(name, module)`` says which modules are candidates. Returns which
    modules and parameters were offloaded.
    """
    device = torch.device(device)
    if pin_memory is None:
        pin_memory = device.type != "cpu"
    report = OffloadReport()
    offloaded: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if report.offloaded_bytes >= offload_bytes:
            break
        params = list(module.parameters(recurse=False))
        if not params or not may_offload(name, module):
            continue
        offloaded.append((name, module))
        report.offloaded_modules.append(name)
        report.offloaded_parameters.extend(f"{name}.{n}" if name else n
                                           for n, _ in module.named_parameters(recurse=False))
        report.offloaded_bytes += _param_bytes(params)
    # Everything else (parameters of kept modules, and every buffer) goes to the device.
    offloaded_ids = {id(p) for _, m in offloaded for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if id(param) in offloaded_ids:
            host = param.data.to("cpu")
            param.data = host.pin_memory() if pin_memory else host
        else:
            param.data = param.data.to(device)
            report.device_bytes += param.numel() * param.element_size()
    for module in model.modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[buf_name] = buf.to(device)
    for _, module in offloaded:
        _install_streaming_hooks(module, device)
    return report


def _install_streaming_hooks(module: nn.Module, device: torch.device) -> None:
    params = list(module.parameters(recurse=False))
    host_copies = [p.data for p in params]

    def to_device(_module, _args):
        for param, host in zip(params, host_copies):
            # copy=True so the module never computes with (or could modify) the host copy itself.
            param.data = host.to(device, non_blocking=True, copy=True)

    def back_to_host(_module, _args, _output):
        # Dropping the device copy frees it for the next module; the host copy was never modified.
        for param, host in zip(params, host_copies):
            param.data = host

    module.register_forward_pre_hook(to_device)
    module.register_forward_hook(back_to_host)
