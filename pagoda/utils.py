"""Small shared helpers, including vLLM's ``FlexibleArgumentParser`` so scripts written for
``vllm.utils`` work unchanged."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also accepts ``--flag_name`` for ``--flag-name`` (as vLLM's does)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        if args is None:
            args = sys.argv[1:]
        return super().parse_args(_normalize(args), namespace)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(_normalize(args), namespace)


def _normalize(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg.startswith("--") and not arg.startswith("---"):
            name, eq, value = arg.partition("=")
            out.append(name.replace("_", "-") + eq + value)
        else:
            out.append(arg)
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@contextlib.contextmanager
def environ_set(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the ``with`` block, then put back what was there (unset ones unset)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
