"""Attention-backend selection."""

from __future__ import annotations

from pagoda import envs
from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.logger import init_logger
from pagoda.platforms.interface import Platform
from pagoda.plugins.registry import Registry, get_registry

logger = init_logger(__name__)

__all__ = ["AttentionBackend", "AttentionConfig", "select_attention_backend"]


def select_attention_backend(platform: type[Platform], config: AttentionConfig, requested: str | None = None,
                             registry: Registry | None = None) -> type[AttentionBackend]:
    """The requested backend (``--attention-backend`` or ``VLLM_ATTENTION_BACKEND``) if it can run, else the
    first of the platform's priority list whose ``validate`` passes. Never falls back silently: a requested
    backend that can't run is an error with its reasons."""
    registry = registry or get_registry()
    requested = requested or envs.attention_backend()
    if requested:
        backend = registry.get_attention_backend(requested)
        reasons = backend.validate(config)
        if reasons:
            raise ValueError(f"attention backend {backend.name} was requested but can't run here: "
                             + "; ".join(reasons))
        logger.info("attention backend %s (requested)", backend.name)
        return backend
    rejected: list[str] = []
    for name in platform.attention_backends:
        backend = registry.attention_backends.get(name)
        if backend is None:
            rejected.append(f"{name}: not registered")
            continue
        reasons = backend.validate(config)
        if not reasons:
            if rejected:
                logger.info("attention backend %s (platform %s priority; skipped %s)", name, platform.name,
                            "; ".join(rejected))
            else:
                logger.info("attention backend %s (first in platform %s's priority list)", name, platform.name)
            return backend
        rejected.append(f"{name}: {'; '.join(reasons)}")
    raise RuntimeError(f"no attention backend of platform {platform.name} can run this model: "
                       + " | ".join(rejected))
