"""Discovers plugins from entry points and keeps what they register.

The registry is built once per process (``get_registry()``); tests can build fresh ones with
``Registry.load()``. A plugin that fails to import or whose hook raises is recorded with its exception and
logged by name; the others still load.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from pagoda import envs
from pagoda.logger import init_logger
from pagoda.plugins import hookspecs

logger = init_logger(__name__)


@dataclass
class PluginRecord:
    """One entry point in the ``pagoda.plugins`` group and what became of it."""

    name: str
    value: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "excluded" | "failed"
    error: str | None = None
    provides: list[str] = field(default_factory=list)


class Registry:
    """Everything the installed plugins registered, keyed by name."""

    def __init__(self) -> None:
        self.plugins: list[PluginRecord] = []
        self.platforms: dict[str, type] = {}
        self.attention_backends: dict[str, type] = {}
        self.quantization_methods: dict[str, type] = {}
        self.models: dict[str, type] = {}
        self.ops: dict[str, dict[str, type]] = {}  # op name → implementation name → class
        self._owner: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, allow_list: list[str] | None = None, extra_modules: dict[str, ModuleType] | None = None) -> Registry:
        """Load every entry point of the ``pagoda.plugins`` group.

        ``allow_list`` defaults to ``VLLM_PLUGINS``; ``extra_modules`` registers modules directly (tests).
        """
        registry = cls()
        if allow_list is None:
            allow_list = envs.plugins_allow_list()
        entry_points = sorted(importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name,
                value=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                status="loaded",
            )
            registry.plugins.append(record)
            if allow_list is not None and ep.name not in allow_list:
                record.status = "excluded"
                record.error = "not in VLLM_PLUGINS"
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                registry._fail(record, exc)
                continue
            registry._register_module(record, module)
        for name, module in (extra_modules or {}).items():
            record = PluginRecord(name=name, value=module.__name__, distribution=None, version=None, status="loaded")
            registry.plugins.append(record)
            registry._register_module(record, module)
        return registry

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        logger.error("plugin %r (%s) failed to load: %s", record.name, record.value, record.error)

    def _register_module(self, record: PluginRecord, module: ModuleType) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(module, name=record.name)
            results = {
                "platform": pm.hook.pagoda_register_platforms(),
                "attention_backend": pm.hook.pagoda_register_attention_backends(),
                "quantization_method": pm.hook.pagoda_register_quantization_methods(),
                "model": pm.hook.pagoda_register_models(),
                "op": pm.hook.pagoda_register_ops(),
            }
        except Exception as exc:
            self._fail(record, exc)
            return
        for kind, per_impl in results.items():
            for contributed in per_impl:
                if kind == "model":
                    for arch, model_cls in dict(contributed).items():
                        self._add(record, kind, self.models, arch, model_cls)
                elif kind == "op":
                    for impl in contributed:
                        self._add(record, f"op:{impl.op}", self.ops.setdefault(impl.op, {}), impl.name, impl)
                else:
                    for item in contributed:
                        self._add(record, kind, self._table(kind), item.name, item)

    def _table(self, kind: str) -> dict[str, type]:
        return {
            "platform": self.platforms,
            "attention_backend": self.attention_backends,
            "quantization_method": self.quantization_methods,
        }[kind]

    def _add(self, record: PluginRecord, kind: str, table: dict[str, Any], name: str, item: Any) -> None:
        owner = self._owner.get((kind, name))
        if owner is not None and table.get(name) is not item:
            # Entry points are processed in name order, so the winner is deterministic.
            logger.warning("%s %r from plugin %r is already registered by %r; keeping %r's", kind, name,
                           record.name, owner, owner)
            return
        table[name] = item
        self._owner[(kind, name)] = record.name
        record.provides.append(f"{kind}:{name}")

    # ------------------------------------------------------------------ lookups
    def owner_of(self, kind: str, name: str) -> str | None:
        return self._owner.get((kind, name))

    def get_attention_backend(self, name: str) -> type:
        try:
            return self.attention_backends[name.upper()]
        except KeyError:
            raise ValueError(f"unknown attention backend {name!r}; valid names: "
                             f"{', '.join(sorted(self.attention_backends)) or '(none registered)'}") from None

    def get_quantization_method(self, name: str) -> type:
        try:
            return self.quantization_methods[name.lower()]
        except KeyError:
            raise ValueError(f"unknown quantization method {name!r}; valid names: "
                             f"{', '.join(sorted(self.quantization_methods)) or '(none registered)'}") from None

    def get_model_class(self, architectures: list[str]) -> type:
        for arch in architectures:
            if arch in self.models:
                return self.models[arch]
        raise ValueError(f"model architectures {architectures} are not supported; supported architectures: "
                         f"{', '.join(sorted(self.models))}")


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry.load()
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry so the next ``get_registry()`` reloads (tests, env changes)."""
    global _registry
    with _lock:
        _registry = None
