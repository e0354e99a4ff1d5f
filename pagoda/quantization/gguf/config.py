"""The Hugging Face config a GGUF file's metadata describes, per architecture.

llama.cpp writes the model's hyperparameters under ``<arch>.*`` keys; some of what the HF config holds it leaves
implicit in its own code (Gemma 3's local rope base, the attention scale of Gemma 2/3, Qwen3-MoE's renormalised
top-k): those follow llama.cpp, which runs these files, with the reason beside each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T

from pagoda.quantization.gguf.architectures import ARCHITECTURES, MIXTRAL, Architecture
from pagoda.quantization.gguf.reader import GGUFError, GGUFFile


def meta(f: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
    value = f.metadata.get(key, default)
    if value is None and required:
        raise GGUFError(f"{f.path}: metadata key {key!r} is missing")
    return value


def architecture(f: GGUFFile) -> Architecture:
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: general.architecture {arch!r} is not supported; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    if arch == "llama" and int(meta(f, "llama.expert_count", 0) or 0) > 0:
        return MIXTRAL
    return ARCHITECTURES[arch]


def _model_dtype(f: GGUFFile) -> torch.dtype:
    """The float type the model was exported in; quantized files compute in float32 (llama.cpp's choice)."""
    types = {info.ggml_type for info in f.tensors.values() if len(info.shape) >= 2}
    if types <= {T.F16, T.F32} and T.F16 in types:
        return torch.float16
    if types <= {T.BF16, T.F32} and T.BF16 in types:
        return torch.bfloat16
    return torch.float32


def output_is_embedding(f: GGUFFile) -> bool:
    """Whether the LM head is the embedding table: no ``output.weight``, or one that is a byte-for-byte copy of
    ``token_embd.weight`` (llama.cpp's GPT-2 converter writes the tied head out again)."""
    out, embed = f.tensors.get("output.weight"), f.tensors.get("token_embd.weight")
    if out is None:
        return True
    if embed is None or (out.shape, out.ggml_type, out.nbytes) != (embed.shape, embed.ggml_type, embed.nbytes):
        return False
    return torch.equal(f.tensor_bytes("output.weight"), f.tensor_bytes("token_embd.weight"))


def _rope(f: GGUFFile, arch: str, theta: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = meta(f, f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        params = {"rope_type": scaling, "rope_theta": theta,
                  "factor": float(meta(f, f"{arch}.rope.scaling.factor", 1.0))}
        original = meta(f, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
    elif scaling not in (None, "none"):
        raise GGUFError(f"{f.path}: {arch}.rope.scaling.type {scaling!r} is not supported "
                        "(supported: none, linear, yarn)")
    return params


def _factors(f: GGUFFile, name: str) -> list[float]:
    info = f.tensors[name]
    if info.ggml_type != T.F32:
        raise GGUFError(f"{f.path}: {name} is {info.type_name}; LongRoPE factors are read as F32")
    return np.frombuffer(f.tensor_bytes(name).numpy().tobytes(), dtype=np.float32).tolist()


def _attention_scalar(f: GGUFFile, arch: str, hidden: int, heads: int, head_dim: int) -> int:
    """Gemma 2/3's query_pre_attn_scalar, which llama.cpp derives instead of storing: the head size, except for
    the 27B models (46 layers for Gemma 2, 62 for Gemma 3), which scale by hidden / heads."""
    layers = int(meta(f, f"{arch}.block_count", required=True))
    return hidden // heads if (arch, layers) in (("gemma2", 46), ("gemma3", 62)) else head_dim


def hf_config_kwargs(f: GGUFFile) -> tuple[str, dict[str, Any]]:
    """``(model_type, kwargs)`` for ``AutoConfig.for_model``."""
    spec = architecture(f)
    arch = spec.name
    hidden = int(meta(f, f"{arch}.embedding_length", required=True))
    heads = int(meta(f, f"{arch}.attention.head_count", required=True))
    head_dim = int(meta(f, f"{arch}.attention.key_length", hidden // heads))
    embed = f.tensors.get("token_embd.weight")
    vocab = (embed.shape[0] if embed is not None else meta(f, f"{arch}.vocab_size")
             or len(meta(f, "tokenizer.ggml.tokens", required=True)))
    common: dict[str, Any] = dict(
        architectures=[spec.hf_architecture], vocab_size=int(vocab),
        tie_word_embeddings=output_is_embedding(f),
        bos_token_id=meta(f, "tokenizer.ggml.bos_token_id"), eos_token_id=meta(f, "tokenizer.ggml.eos_token_id"),
        pad_token_id=meta(f, "tokenizer.ggml.padding_token_id"), dtype=_model_dtype(f))
    layers = int(meta(f, f"{arch}.block_count", required=True))
    context = int(meta(f, f"{arch}.context_length", 2048))
    if arch == "gpt2":
        return spec.model_type, dict(
            common, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
            n_inner=int(meta(f, f"{arch}.feed_forward_length", 4 * hidden)),
            layer_norm_epsilon=float(meta(f, f"{arch}.attention.layer_norm_epsilon", 1e-5)))
    kv_heads = int(meta(f, f"{arch}.attention.head_count_kv", heads))
    theta = float(meta(f, f"{arch}.rope.freq_base", 10000.0))
    ffn = meta(f, f"{arch}.feed_forward_length", meta(f, f"{arch}.expert_feed_forward_length"))
    if ffn is None:
        raise GGUFError(f"{f.path}: metadata key {arch}.feed_forward_length is missing")
    kwargs: dict[str, Any] = dict(
        common, hidden_size=hidden, intermediate_size=int(ffn), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(meta(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=context, rope_parameters=_rope(f, arch, theta))
    window = meta(f, f"{arch}.attention.sliding_window")
    if arch.startswith("gemma"):
        if arch != "gemma":
            kwargs["sliding_window"] = int(window) if window is not None else 4096
            kwargs["query_pre_attn_scalar"] = _attention_scalar(f, arch, hidden, heads, head_dim)
        if arch == "gemma2":  # llama.cpp's defaults when the keys are absent: Gemma 2's published caps
            kwargs["attn_logit_softcapping"] = float(meta(f, f"{arch}.attn_logit_softcapping", 50.0))
            kwargs["final_logit_softcapping"] = float(meta(f, f"{arch}.final_logit_softcapping", 30.0))
        if arch == "gemma3":
            pattern = meta(f, f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, (list, np.ndarray)):  # per layer: whether it uses the sliding window
                kwargs["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
            elif pattern is not None:
                kwargs["sliding_window_pattern"] = int(pattern)
            # llama.cpp runs Gemma 3's local (sliding) layers with rope base 10000, whatever freq_base says
            kwargs["rope_parameters"] = {"full_attention": kwargs["rope_parameters"],
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    if arch == "phi3":
        if window is not None:
            kwargs["sliding_window"] = int(window)
        if "rope_factors_long.weight" in f.tensors:
            original = meta(f, f"{arch}.rope.scaling.original_context_length", context)
            kwargs["rope_parameters"] = {
                "rope_type": "longrope", "rope_theta": theta, "original_max_position_embeddings": int(original),
                "long_factor": _factors(f, "rope_factors_long.weight"),
                "short_factor": _factors(f, "rope_factors_short.weight")}
            kwargs["original_max_position_embeddings"] = int(original)
        rot = meta(f, f"{arch}.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            kwargs["partial_rotary_factor"] = int(rot) / head_dim
    if spec is MIXTRAL:  # renormalised top-k, every layer sparse: nothing more to read
        kwargs["num_local_experts"] = int(meta(f, f"{arch}.expert_count", required=True))
        kwargs["num_experts_per_tok"] = int(meta(f, f"{arch}.expert_used_count", required=True))
        kwargs["sliding_window"] = None
    elif spec.experts:
        kwargs["num_experts"] = int(meta(f, f"{arch}.expert_count", required=True))
        kwargs["num_experts_per_tok"] = int(meta(f, f"{arch}.expert_used_count", required=True))
        kwargs["moe_intermediate_size"] = int(meta(f, f"{arch}.expert_feed_forward_length", ffn))
        # Whether the chosen experts' weights are renormalised: the file's key where the converter wrote it, else
        # what llama.cpp does for the architecture (Qwen3-MoE yes, as its published configs; Qwen2-MoE no)
        kwargs["norm_topk_prob"] = bool(meta(f, f"{arch}.expert_weights_norm", arch == "qwen3moe"))
        if arch == "qwen2moe":
            kwargs["shared_expert_intermediate_size"] = int(
                meta(f, f"{arch}.expert_shared_feed_forward_length", kwargs["moe_intermediate_size"]))
    return spec.model_type, kwargs
