"""Small shared helpers, including vLLM's ``FlexibleArgumentParser`` so scripts written for
``vllm.utils`` work unchanged."""

from __future__ import annotations

import argparse
import sys


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
