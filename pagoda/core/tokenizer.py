"""Loading the tokenizer that goes with a model."""

from __future__ import annotations

from typing import Any

from pagoda.core.config import ModelConfig


def load_tokenizer(model_config: ModelConfig) -> Any:
    """``--tokenizer`` if given (a directory, hub id or GGUF file), else the model's own: from the checkpoint
    format's metadata (GGUF) or the Hugging Face directory."""
    from transformers import AutoTokenizer

    from pagoda.core.model_files import resolve_model_path

    if model_config.tokenizer:
        path = resolve_model_path(model_config.tokenizer, model_config.tokenizer_revision)
        fmt = model_config.checkpoint_format
        if fmt is not None and fmt.detect(path):
            return fmt.load_tokenizer(fmt.detect(path))
    elif model_config.checkpoint_format is not None:
        return model_config.checkpoint_format.load_tokenizer(model_config.weight_file)
    else:
        path = model_config.path
    return AutoTokenizer.from_pretrained(path, trust_remote_code=model_config.trust_remote_code,
                                         revision=model_config.tokenizer_revision,
                                         use_fast=model_config.tokenizer_mode != "slow")
