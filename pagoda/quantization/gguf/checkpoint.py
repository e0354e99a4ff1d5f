"""GGUF as a checkpoint format: finding the file, and turning its metadata and tensors into Hugging Face form.

The model config and tokenizer come from the file's metadata; tensors are yielded under the Hugging Face names
the models use. 2-D weights stay quantized (:class:`GGUFWeight`, a view of the memory-mapped bytes) and are
repacked by :mod:`pagoda.quantization.gguf.methods`; 1-D tensors (norms, biases) are plain float tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from gguf.constants import GGMLQuantizationType as T

from pagoda.quantization.gguf.architectures import ARCHITECTURES, Architecture, unpermute_rows
from pagoda.quantization.gguf.config import architecture, hf_config_kwargs
from pagoda.quantization.gguf.dequant import dequantize
from pagoda.quantization.gguf.reader import GGUF_MAGIC, GGUFError, GGUFFile, open_gguf
from pagoda.quantization.interface import CheckpointFormat

# Kept for importers: the architectures live in their own table module.
SUPPORTED_ARCHITECTURES = {name: (a.model_type, a.hf_architecture) for name, a in ARCHITECTURES.items()}


@dataclass(frozen=True)
class GGUFWeight:
    """A 2-D weight as stored in the file: ``data`` [rows, bytes_per_row] uint8 (a view of the map, or a
    row-permuted copy), ``ggml_type`` and the logical ``shape`` (out_features, in_features)."""

    name: str
    data: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    @property
    def type_name(self) -> str:
        return T(self.ggml_type).name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.ggml_type, dtype)


# general.sampling.<key> of a GGUF file → the generation_config.json key it stands for (llama.cpp writes these
# from a model's recommended settings; its mirostat and XTC samplers have no counterpart here)
SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}


class GGUFCheckpoint(CheckpointFormat):
    """llama.cpp's single-file format (the architectures of :mod:`.architectures`: Llama, SmolLM, Mistral, Qwen2/3,
    Gemma 1/2/3, Phi-3, GPT-2, Qwen2/3-MoE)."""

    @classmethod
    def detect(cls, path: str) -> str | None:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if os.path.isfile(os.path.join(path, n)) and _is_gguf(os.path.join(path, n)))
            if len(found) > 1:
                raise GGUFError(f"{path} holds {len(found)} GGUF files "
                                f"({', '.join(os.path.basename(p) for p in found)});"
                                " pass the path of the one to load")
            return found[0] if found else None
        if path.endswith(".gguf"):
            return path  # even if missing or corrupt: loading it then gives the precise error
        return path if os.path.isfile(path) and _is_gguf(path) else None

    @classmethod
    def load_hf_config(cls, file: str) -> Any:
        from transformers import AutoConfig

        model_type, kwargs = hf_config_kwargs(open_gguf(file))
        config = AutoConfig.for_model(model_type, **kwargs)
        rope = kwargs.get("rope_parameters", {})
        if "rope_theta" in rope:
            # transformers 5 keeps rope_theta inside rope_parameters; older readers look for the attribute.
            config.rope_theta = rope["rope_theta"]
        return config

    @classmethod
    def load_generation_config(cls, file: str) -> dict[str, Any]:
        """llama.cpp's ``general.sampling.*`` keys, the GGUF counterpart of ``generation_config.json``."""
        f = open_gguf(file)
        config = {}
        for gguf_key, key in SAMPLING_KEYS.items():
            value = f.metadata.get(f"general.sampling.{gguf_key}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                config[key] = value
        return config

    @classmethod
    def load_tokenizer(cls, file: str) -> Any:
        from pagoda.quantization.gguf.tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(file)

    @classmethod
    def iter_weights(cls, file: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        f = open_gguf(file)
        spec = architecture(f)
        f.check_supported()
        heads = int(hf_config.num_attention_heads)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        for info in list(f.tensors.values()):
            if info.name in spec.skipped or (tied and info.name == "output.weight"):
                continue  # a head that copies the embedding table: the model ties the two
            if len(info.shape) == 3:
                yield from _experts(f, spec, info)
                f.release(info.name)
                continue
            name = spec.hf_name(info.name)
            if name is None:
                raise GGUFError(f"{file}: tensor {info.name!r} has no counterpart in the {spec.name} model")
            data = f.tensor_bytes(info.name)
            if len(info.shape) == 1:
                value: Any = spec.unnormalize(info.name, dequantize(data, info.ggml_type).reshape(-1).clone())
                if spec.dense(info.name):  # a 1-D gate of a linear layer with one output (Qwen2-MoE)
                    value = value.reshape(1, -1)
            elif len(info.shape) == 2 and spec.dense(info.name):
                value = dequantize(data, info.ggml_type)
            elif len(info.shape) == 2:
                if spec.permuted_qk and info.name.endswith((".attn_q.weight", ".attn_k.weight")):
                    n = heads if ".attn_q." in info.name else kv_heads
                    data = data[unpermute_rows(n, data.shape[0])]
                value = GGUFWeight(info.name, data, info.ggml_type, (info.shape[0], info.shape[1]))
            else:
                raise GGUFError(f"{file}: tensor {info.name!r} has {len(info.shape)} dimensions; only 1-D, 2-D and "
                                "3-D expert tensors are supported")
            yield name, value
            del value
            f.release(info.name)


def _experts(f: GGUFFile, spec: Architecture, info) -> Iterator[tuple[str, torch.Tensor]]:
    """A 3-D expert stack [experts, out, in] as one float32 weight per expert. No quantized MoE path exists
    (the fused-MoE op takes dense stacked weights), so experts are dequantized on load, one at a time."""
    pattern = spec.expert_names(info.name)
    if pattern is None:
        raise GGUFError(f"{f.path}: tensor {info.name!r} (3-D) has no counterpart in the {spec.name} model")
    experts, rows = info.shape[0], info.shape[1]
    data = f.tensor_bytes(info.name)  # [experts * out, bytes per row]
    for e in range(experts):
        yield pattern.format(e=e), dequantize(data[e * rows:(e + 1) * rows], info.ggml_type)


def _is_gguf(path: str) -> bool:
    if path.endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False
