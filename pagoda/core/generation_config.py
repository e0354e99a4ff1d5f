"""The generation defaults a model brings (vLLM's ``--generation-config``)."""

from __future__ import annotations

import json
import os
from typing import Any

from pagoda.core.model_files import BUNDLED_GENERATION_CONFIG, bundled_model_path


def read_generation_config(model_config: Any) -> dict[str, Any]:
    """The generation defaults per ``generation_config``, as vLLM's ``--generation-config``: "vllm" none; a folder
    its ``generation_config.json``; "auto" the model's own — the sampling keys a weight file carries (GGUF's
    ``general.sampling.*``), overridden by a ``generation_config.json`` in the model's directory, and for the
    bundled default model, which carries neither, pagoda's documented settings for it. ``override_generation_config``
    is applied last."""
    choice = model_config.generation_config
    values: dict[str, Any] = {}
    if choice == "auto":
        if model_config.checkpoint_format is not None and model_config.weight_file:
            values.update(model_config.checkpoint_format.load_generation_config(model_config.weight_file))
        values.update(_generation_config_file(model_config.path) or {})
        if not values and _is_bundled(model_config.path):
            values = dict(BUNDLED_GENERATION_CONFIG)
    elif choice != "vllm":
        found = _generation_config_file(choice)
        if found is None:
            raise ValueError(f"generation_config: no generation_config.json in {choice!r}")
        values = found
    values.update(model_config.override_generation_config)
    return values


def _generation_config_file(folder: str) -> dict[str, Any] | None:
    file = os.path.join(folder, "generation_config.json") if os.path.isdir(folder) else None
    if file is None or not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def _is_bundled(path: str) -> bool:
    try:
        return os.path.samefile(path, bundled_model_path())
    except (OSError, FileNotFoundError):
        return False
