"""Op selection: one implementation per op, chosen once per engine from the resolved platform.

For each op the implementations that can run on the platform (and the model's dtype) are ranked by priority
(ties by name); the first wins. ``--op-impl`` / ``PAGODA_OP_IMPL`` force a choice per op with a priority list::

    PAGODA_OP_IMPL="rms_norm=torch,linear_dense=cpu_amx|cpu_avx512"

(the first runnable name of each list wins; the flag overrides the variable op by op). A forced list none of whose
implementations can run is an error with each one's reason, never a silent fallback. The choice and the reason
every other implementation was passed over are kept in :attr:`OpSet.choices` (``pagoda env`` shows them).

Models and attention backends get the engine's :class:`OpSet` from :func:`current_ops`, which the engine sets
with :func:`use_ops` while it builds the model and the runner; outside an engine it is the reference set.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagoda import envs
from pagoda.ops.interface import OPS, OpImpl

if TYPE_CHECKING:
    from pagoda.platforms.interface import Platform
    from pagoda.plugins.registry import Registry

__all__ = ["OPS", "OpImpl", "OpChoice", "OpSet", "select_ops", "parse_op_impl", "current_ops", "use_ops",
           "reference_ops"]


@dataclass
class OpChoice:
    op: str
    chosen: str
    forced: bool
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (implementation, why not)
    candidates: list[str] = field(default_factory=list)  # every registered implementation, best first


class OpSet:
    """The chosen implementation of every op, as attributes (``ops.rms_norm(x, w, eps)``)."""

    def __init__(self, impls: dict[str, OpImpl], choices: dict[str, OpChoice]) -> None:
        self._impls = impls
        self.choices = choices
        for name, impl in impls.items():
            setattr(self, name, impl)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not set
        if "_impls" not in self.__dict__:  # unpickling (a worker process receiving the config) asks before it's set
            raise AttributeError(name)
        raise AttributeError(f"no op named {name!r}; ops: {', '.join(sorted(self._impls))}")

    def implementations(self) -> dict[str, OpImpl]:
        """op name → the chosen implementation."""
        return dict(self._impls)


def parse_op_impl(spec: str | None) -> dict[str, list[str]]:
    """``"op=a|b,op2=c"`` → ``{"op": ["a", "b"], "op2": ["c"]}``; malformed entries are an error naming them."""
    forced: dict[str, list[str]] = {}
    for entry in (spec or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        op, sep, names = entry.partition("=")
        op = op.strip()
        impls = [n.strip() for n in names.split("|") if n.strip()]
        if not sep or not op or not impls:
            raise ValueError(f"op_impl: {entry!r} is not OP=IMPL[|IMPL...]; ops: {', '.join(OPS)}")
        forced[op] = impls
    return forced


def _ranked(impls: list[type[OpImpl]], platform: type[Platform]) -> list[type[OpImpl]]:
    return sorted(impls, key=lambda c: (-c.rank(platform), c.name))


def _lower(impl: type[OpImpl], chosen: type[OpImpl], platform: type[Platform]) -> str:
    note = impl.rank_note(platform)
    return f"lower priority here ({impl.rank(platform)} < {chosen.rank(platform)})" + (f": {note}" if note else "")


def select_ops(platform: type[Platform], dtype: torch.dtype | None = None, forced: str | None = None,
               registry: Registry | None = None) -> OpSet:
    """Choose an implementation of every op for ``platform`` and a model in ``dtype``.

    ``forced`` is the ``--op-impl`` spec; ``PAGODA_OP_IMPL`` fills in the ops it doesn't name.
    """
    from pagoda.plugins.registry import get_registry

    registry = registry or get_registry()
    wishes = parse_op_impl(envs.op_impl())
    wishes.update(parse_op_impl(forced))
    unknown = sorted(set(wishes) - set(registry.ops))
    if unknown:
        raise ValueError(f"op_impl: unknown op(s) {', '.join(unknown)}; ops: {', '.join(sorted(registry.ops))}")
    impls: dict[str, OpImpl] = {}
    choices: dict[str, OpChoice] = {}
    for op, by_name in sorted(registry.ops.items()):
        ranked = _ranked(list(by_name.values()), platform)
        reasons = {c.name: c.unavailable_reason(platform, dtype) for c in ranked}
        wish = wishes.get(op)
        if wish is not None:
            missing = [n for n in wish if n not in by_name]
            if missing:
                raise ValueError(f"op_impl: op {op} has no implementation {', '.join(map(repr, missing))}; "
                                 f"implementations: {', '.join(c.name for c in ranked)}")
            order = [by_name[n] for n in wish]
        else:
            order = ranked
        chosen = next((c for c in order if reasons[c.name] is None), None)
        if chosen is None:
            detail = "; ".join(f"{c.name}: {reasons[c.name]}" for c in order)
            if wish is not None:
                raise ValueError(f"op_impl: {op}={'|'.join(wish)} can't run on platform {platform.name}: {detail}")
            raise RuntimeError(f"no implementation of op {op} can run on platform {platform.name}: {detail}")
        passed = [(c.name, reasons[c.name] or (f"not in op_impl {op}={'|'.join(wish)}" if wish else
                                               _lower(c, chosen, platform)))
                  for c in ranked if c is not chosen]
        choices[op] = OpChoice(op, chosen.name, wish is not None, passed, [c.name for c in ranked])
        impls[op] = chosen()
    missing_ops = sorted(set(OPS) - set(impls))
    if missing_ops:
        raise RuntimeError(f"no implementation registered for op(s) {', '.join(missing_ops)} (is the built-in "
                           "'reference_ops' plugin excluded by VLLM_PLUGINS?)")
    return OpSet(impls, choices)


def reference_ops() -> OpSet:
    """The plain-torch reference implementation of every op."""
    from pagoda.ops import reference

    impls = {cls.op: cls() for cls in reference.REFERENCE_IMPLS + reference.QUANT_REFERENCE_IMPLS}
    return OpSet(impls, {op: OpChoice(op, "torch", False) for op in impls})


_local = threading.local()
_reference: OpSet | None = None


def current_ops() -> OpSet:
    """The op set of the engine being built on this thread (see :func:`use_ops`); the reference set otherwise."""
    ops = getattr(_local, "ops", None)
    if ops is not None:
        return ops
    global _reference
    if _reference is None:
        _reference = reference_ops()
    return _reference


@contextlib.contextmanager
def use_ops(ops: OpSet) -> Iterator[OpSet]:
    """Make ``ops`` what :func:`current_ops` returns on this thread while layers and backends are built."""
    previous = getattr(_local, "ops", None)
    _local.ops = ops
    try:
        yield ops
    finally:
        _local.ops = previous
