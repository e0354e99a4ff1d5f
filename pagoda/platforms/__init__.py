"""Platform resolution: which registered platform this process runs on."""

from __future__ import annotations

from pagoda.logger import init_logger
from pagoda.platforms.interface import Platform
from pagoda.plugins.registry import Registry, get_registry

logger = init_logger(__name__)

__all__ = ["Platform", "resolve_platform"]


def resolve_platform(device: str | None = "auto", registry: Registry | None = None) -> type[Platform]:
    """The platform named by ``device``, or the available one with the highest priority for ``auto``.

    Ties in priority are broken by name so the choice is deterministic, and logged.
    """
    registry = registry or get_registry()
    platforms = registry.platforms
    if device and device != "auto":
        name = device.split(":")[0].lower()
        if name not in platforms:
            raise ValueError(f"unknown device {device!r}; registered platforms: {', '.join(sorted(platforms))}")
        platform = platforms[name]
        reason = platform.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"device {device!r} was requested but platform {name!r} cannot run here: {reason}")
        return platform
    available = [p for p in platforms.values() if p.unavailable_reason() is None]
    if not available:
        reasons = "; ".join(f"{n}: {p.unavailable_reason()}" for n, p in sorted(platforms.items()))
        raise RuntimeError(f"no platform is available ({reasons or 'no platform plugin is registered'})")
    available.sort(key=lambda p: (-p.priority, p.name))
    chosen = available[0]
    ties = [p.name for p in available if p.priority == chosen.priority]
    if len(ties) > 1:
        logger.info("platforms %s share priority %d; chose %r by name order", ties, chosen.priority, chosen.name)
    return chosen
