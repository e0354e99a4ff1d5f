"""GGUF as a checkpoint format: finding the file, and turning its metadata and tensors into Hugging Face form.

The model config and tokenizer come from the file's metadata; tensors are yielded under the Hugging Face names
the models use. 2-D weights stay quantized (:class:`GGUFWeight`, a view of the memory-mapped bytes) and are
repacked by :mod:`pagoda.quantization.gguf.methods`; 1-D tensors (norms, biases) are plain float tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from gguf.constants import GGMLQuantizationType as T

from pagoda.quantization.gguf.dequant import dequantize
from pagoda.quantization.gguf.reader import GGUF_MAGIC, GGUFError, GGUFFile, open_gguf
from pagoda.quantization.interface import CheckpointFormat

#: general.architecture → (transformers model_type, architectures entry)
SUPPORTED_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# llama.cpp's converter interleaves the rows of Q and K of these architectures for its rope layout.
_PERMUTED_QK = {"llama"}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp stores that have no parameter in the Hugging Face model (precomputed rope frequencies).
_SKIPPED = {"rope_freqs.weight"}


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


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, ``None`` for tensors models have no use for."""
    if gguf_name in _SKIPPED:
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        return None
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    return None


def unpermute_rows(n_heads: int, rows: int) -> torch.Tensor:
    """Row index undoing llama.cpp's Q/K permutation: ``hf = gguf[index]``.

    The converter stores, per head, the rows of the two rotary halves interleaved (row ``2i+a`` of a head is
    HF row ``a*half + i``), so that its rope pairs adjacent dimensions; HF's rotate-half pairs ``i`` with
    ``i + half``. Rows are whole quantization blocks along the input dimension, so this works on raw bytes.
    """
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(-1)


# general.sampling.<key> of a GGUF file → the generation_config.json key it stands for (llama.cpp writes these
# from a model's recommended settings; its mirostat and XTC samplers have no counterpart here)
SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}


def _meta(f: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
    value = f.metadata.get(key, default)
    if value is None and required:
        raise GGUFError(f"{f.path}: metadata key {key!r} is missing")
    return value


def _architecture(f: GGUFFile) -> str:
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{f.path}: general.architecture {arch!r} is not supported; supported: "
                        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    return arch


def _model_dtype(f: GGUFFile) -> torch.dtype:
    """The float type the model was exported in; quantized files compute in float32 (llama.cpp's choice)."""
    types = {info.ggml_type for info in f.tensors.values() if len(info.shape) == 2}
    if types <= {T.F16, T.F32} and T.F16 in types:
        return torch.float16
    if types <= {T.BF16, T.F32} and T.BF16 in types:
        return torch.bfloat16
    return torch.float32


class GGUFCheckpoint(CheckpointFormat):
    """llama.cpp's single-file format (llama, SmolLM, Mistral, Qwen2 architectures)."""

    @classmethod
    def detect(cls, path: str) -> str | None:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if os.path.isfile(os.path.join(path, n)) and _is_gguf(os.path.join(path, n)))
            if len(found) > 1:
                raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(os.path.basename(p) for p in found)});"
                                " pass the path of the one to load")
            return found[0] if found else None
        if path.endswith(".gguf"):
            return path  # even if missing or corrupt: loading it then gives the precise error
        return path if os.path.isfile(path) and _is_gguf(path) else None

    @classmethod
    def load_hf_config(cls, file: str) -> Any:
        from transformers import AutoConfig

        f = open_gguf(file)
        arch = _architecture(f)
        model_type, architecture = SUPPORTED_ARCHITECTURES[arch]
        hidden = int(_meta(f, f"{arch}.embedding_length", required=True))
        heads = int(_meta(f, f"{arch}.attention.head_count", required=True))
        kv_heads = _meta(f, f"{arch}.attention.head_count_kv", heads)
        head_dim = int(_meta(f, f"{arch}.attention.key_length", hidden // heads))
        rope_theta = float(_meta(f, f"{arch}.rope.freq_base", 10000.0))
        embed = f.tensors.get("token_embd.weight")
        vocab = (embed.shape[0] if embed is not None else _meta(f, f"{arch}.vocab_size")
                 or len(_meta(f, "tokenizer.ggml.tokens", required=True)))
        dtype = _model_dtype(f)
        kwargs: dict[str, Any] = dict(
            architectures=[architecture],
            hidden_size=hidden,
            intermediate_size=int(_meta(f, f"{arch}.feed_forward_length", required=True)),
            num_hidden_layers=int(_meta(f, f"{arch}.block_count", required=True)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(_meta(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(_meta(f, f"{arch}.context_length", 2048)),
            vocab_size=int(vocab),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=_meta(f, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_meta(f, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_meta(f, "tokenizer.ggml.padding_token_id"),
            dtype=dtype,
        )
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
        scaling = _meta(f, f"{arch}.rope.scaling.type")
        if scaling in ("linear", "yarn"):
            rope_parameters = {"rope_type": scaling, "rope_theta": rope_theta,
                               "factor": float(_meta(f, f"{arch}.rope.scaling.factor", 1.0))}
            original = _meta(f, f"{arch}.rope.scaling.original_context_length")
            if original is not None:
                rope_parameters["original_max_position_embeddings"] = int(original)
        elif scaling not in (None, "none"):
            raise GGUFError(f"{file}: {arch}.rope.scaling.type {scaling!r} is not supported "
                            "(supported: none, linear, yarn)")
        config = AutoConfig.for_model(model_type, rope_parameters=rope_parameters, **kwargs)
        # transformers 5 keeps rope_theta inside rope_parameters; older readers look for the attribute.
        config.rope_theta = rope_theta
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
        arch = _architecture(f)
        f.check_supported()
        heads = int(hf_config.num_attention_heads)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
        for info in list(f.tensors.values()):
            name = hf_name(info.name)
            if name is None:
                if info.name in _SKIPPED:
                    continue
                raise GGUFError(f"{file}: tensor {info.name!r} has no counterpart in the {arch} model")
            if len(info.shape) == 1:
                value: Any = dequantize(f.tensor_bytes(info.name), info.ggml_type).reshape(-1).clone()
            elif len(info.shape) == 2:
                data = f.tensor_bytes(info.name)
                if arch in _PERMUTED_QK and info.name.endswith((".attn_q.weight", ".attn_k.weight")):
                    n = heads if ".attn_q." in info.name else kv_heads
                    data = data[unpermute_rows(n, data.shape[0])]
                value = GGUFWeight(info.name, data, info.ggml_type, (info.shape[0], info.shape[1]))
            else:
                raise GGUFError(f"{file}: tensor {info.name!r} has {len(info.shape)} dimensions; only 1-D and "
                                "2-D tensors are supported")
            yield name, value
            del value
            f.release(info.name)


def _is_gguf(path: str) -> bool:
    if path.endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False
