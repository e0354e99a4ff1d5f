"""The `pagoda` logger, configured once."""

from __future__ import annotations

import logging
import sys

from pagoda import envs

_configured = False


def init_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("pagoda")
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
            root.addHandler(handler)
        root.setLevel(envs.logging_level())
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
