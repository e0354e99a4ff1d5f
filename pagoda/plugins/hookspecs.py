"""The plugin contract: every way a package can extend pagoda.

A plugin is a Python module named by an entry point in the ``pagoda.plugins`` group::

    [project.entry-points."pagoda.plugins"]
    my_accel = "my_accel_pagoda.plugin"

The module defines plain functions marked with :data:`hookimpl` whose names match the specs below. Each
returns the classes it contributes; pagoda instantiates nothing at registration time, so registering is
cheap and side-effect free. Calls are keyword-only, so a spec can later grow an argument without breaking
existing plugins. Pagoda's own CPU platform, TORCH_SDPA backend, unquantized method and models register
through exactly these hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pagoda.attention_backends.interface import AttentionBackend
    from pagoda.ops.interface import OpImpl
    from pagoda.platforms.interface import Platform
    from pagoda.quantization.interface import QuantizationConfig

PROJECT_NAME = "pagoda"
ENTRY_POINT_GROUP = "pagoda.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def pagoda_register_platforms() -> list[type[Platform]]:
    """Return :class:`~pagoda.platforms.interface.Platform` subclasses this plugin provides.

    Each class carries its own availability probe (``Platform.unavailable_reason``); registering a platform
    that cannot run on this machine is expected and fine — it is listed with its reason.
    """


@hookspec
def pagoda_register_attention_backends() -> list[type[AttentionBackend]]:
    """Return :class:`~pagoda.attention_backends.interface.AttentionBackend` subclasses.

    A backend is referenced by its ``name`` (e.g. ``"TORCH_SDPA"``) from a platform's priority list, from
    ``VLLM_ATTENTION_BACKEND`` and from ``--attention-backend``. Import heavy libraries lazily inside the
    backend so that registration never fails because a kernel library is missing; report that from
    ``AttentionBackend.validate`` instead.
    """


@hookspec
def pagoda_register_quantization_methods() -> list[type[QuantizationConfig]]:
    """Return :class:`~pagoda.quantization.interface.QuantizationConfig` subclasses, one per weight format.

    The config's ``name`` is what users pass as ``--quantization`` and what checkpoints name in
    ``quantization_config.quant_method``.
    """


@hookspec
def pagoda_register_ops() -> list[type[OpImpl]]:
    """Return :class:`~pagoda.ops.interface.OpImpl` subclasses: implementations of named ops (``rms_norm``,
    ``linear_dense``, ``paged_decode_attention``, …; :data:`pagoda.ops.interface.OPS`).

    Each declares the op, its own name, the platforms and capabilities it needs and a priority; the engine picks
    one per op for the resolved platform (``pagoda env`` shows the choice). Import kernel libraries lazily, from
    the implementation's methods or its ``check``, so registering never fails because one is missing.
    """


@hookspec
def pagoda_register_models() -> dict[str, type]:
    """Return a mapping from a Hugging Face ``architectures`` name (e.g. ``"LlamaForCausalLM"``) to the
    ``torch.nn.Module`` class that implements it. The class is constructed as
    ``cls(model_config=..., quant_config=...)`` and must provide ``forward`` and ``load_weights``
    (see :mod:`pagoda.models.interface`).
    """
