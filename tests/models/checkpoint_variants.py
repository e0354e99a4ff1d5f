"""Variants of the tiny random checkpoints for the GPT-style families' tests (OPT, GPT-2): random norm weights and
biases, renamed tensors (as checkpoints saved from the bare model name them), and config-only directories for
the tests of unsupported config features."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def randomize_vectors(path: str) -> str:
    """Give a saved tiny model random LayerNorm weights and biases (transformers initialises them to 1 and 0, so
    loading them wrongly would go unnoticed). Done once per directory."""
    from safetensors.torch import load_file, save_file

    marker = Path(path) / ".vectors_randomized"
    if marker.exists():
        return path
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(4321)
    for name, tensor in tensors.items():
        if tensor.dim() == 1 and tensor.dtype.is_floating_point:
            tensors[name] = tensor + 0.1 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    marker.touch()
    return path


def rewrite_checkpoint(source: str, target: Path, rename: Callable[[str], str],
                       extra: dict[str, torch.Tensor] | None = None) -> str:
    """A copy of ``source``'s config and weights in ``target``, each tensor named ``rename(name)``, plus
    ``extra`` tensors."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    tensors = {rename(name): t for name, t in load_file(os.path.join(source, "model.safetensors")).items()}
    tensors.update(extra or {})
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def pagoda_greedy(path: str) -> list[list[int]]:
    """pagoda's float32 greedy tokens for the family prompts (to compare two copies of the same weights without
    asking transformers again)."""
    from tests.models.family_checks import family_prompts, run_pagoda

    _, together, _ = run_pagoda(path, "float32", "default", family_prompts())
    return [o.outputs[0].token_ids for o in together]


def config_only_dir(config, target: Path) -> str:
    """A directory holding only ``config.json`` (enough for a model that refuses its config while being built)."""
    config.save_pretrained(target)
    return str(target)
