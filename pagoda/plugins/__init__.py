"""Plugin discovery and the registries built from it."""

from pagoda.plugins.hookspecs import hookimpl
from pagoda.plugins.registry import PluginRecord, Registry, get_registry

__all__ = ["hookimpl", "PluginRecord", "Registry", "get_registry"]
