"""A plugin module that raises when imported, standing in for a plugin built against a missing or
incompatible dependency. pagoda records it as ``failed`` with this error, logs it by name, and loads the rest."""

raise ImportError("pagoda-broken-plugin fails to import on purpose (its accelerator runtime is missing)")
