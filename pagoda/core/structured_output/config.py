"""The engine-wide structured-output settings: vLLM's ``--structured-outputs-config`` and the older
``--guided-decoding-backend``.

xgrammar is the only backend; ``auto`` picks it. Naming another vLLM backend (outlines, guidance,
lm-format-enforcer) is an error that names the supported one rather than a silent switch to xgrammar.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

#: The backends a request or the engine may name: xgrammar, or auto (which is xgrammar).
SUPPORTED_BACKENDS = ("xgrammar", "auto")


def check_backend(backend: Any, field_name: str) -> str:
    """``backend`` if pagoda can honour it, else a ``ValueError`` naming ``field_name`` and the allowed values."""
    if not isinstance(backend, str) or backend.lower() not in SUPPORTED_BACKENDS:
        raise ValueError(f"{field_name}: only the xgrammar backend is supported ('xgrammar', or 'auto' which picks "
                         f"it), got {backend!r}")
    return backend.lower()


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """vLLM's ``StructuredOutputsConfig`` fields that apply to xgrammar. ``disable_any_whitespace`` and
    ``disable_additional_properties`` here are the defaults of every request; a request's own
    ``StructuredOutputsParams`` flags add to them."""

    backend: str = "auto"
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    @classmethod
    def from_args(cls, config: dict[str, Any] | None, guided_decoding_backend: str | None = None
                  ) -> StructuredOutputsConfig:
        """The config from ``--structured-outputs-config`` (a dict) and ``--guided-decoding-backend``; unknown
        keys and unsupported backends are errors naming the field."""
        values = dict(config or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"structured_outputs_config: unknown key(s) {', '.join(unknown)}; supported: "
                             f"{', '.join(known)}")
        for name in known[1:]:
            if name in values and not isinstance(values[name], bool):
                raise ValueError(f"structured_outputs_config: {name} must be true or false, got {values[name]!r}")
        if "backend" in values:
            values["backend"] = check_backend(values["backend"], "structured_outputs_config")
        if guided_decoding_backend is not None:
            backend = check_backend(guided_decoding_backend, "guided_decoding_backend")
            if "backend" in values and values["backend"] != backend:
                raise ValueError(f"guided_decoding_backend: {backend!r} contradicts structured_outputs_config's "
                                 f"backend {values['backend']!r}; give one of them")
            values["backend"] = backend
        return cls(**values)
