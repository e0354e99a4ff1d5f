"""Tiny models of the GGUF architectures, and their conversion to GGUF as llama.cpp's converter does it.

Names come from the gguf package's own HF → GGUF table (``gguf.get_tensor_name_map``), not from pagoda's reverse
tables, so the tests check one against the other; the converter's transformations are applied here: Gemma's
``1 + w`` norms, GPT-2's Conv1D weights transposed to ``[out, in]``, MoE experts stacked per layer (gate and up as
separate stacks), Qwen2-MoE's shared-expert gate stored 1-D. Sizes: rows of 256 inputs, the K-quants' block.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES

from .kquant_encode import encode

HIDDEN, LAYERS, VOCAB, HEADS, FFN = 256, 2, 512, 4, 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=256)


def tiny_config(arch: str):
    """The transformers config of a tiny model of ``arch`` (a GGUF general.architecture)."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                             n_inner=FFN, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=64)
    if arch == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=64, sliding_window=32, query_pre_attn_scalar=64,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=64, sliding_window=32, query_pre_attn_scalar=64,
                                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}})
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":  # a family pagoda already ran: the generation test's own check
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=64, tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen2moe":
        return tf.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                 shared_expert_intermediate_size=FFN, tie_word_embeddings=False)
    if arch == "qwen3moe":
        return tf.Qwen3MoeConfig(**_COMMON, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=256, tie_word_embeddings=False, norm_topk_prob=True)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from their all-ones (Gemma: all-zeros) init, so that the +1 shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _metadata(arch: str, config) -> dict:
    c = config
    if arch == "gpt2":
        return {"context_length": c.n_positions, "embedding_length": c.n_embd, "block_count": c.n_layer,
                "feed_forward_length": c.n_inner, "attention.head_count": c.n_head,
                "attention.layer_norm_epsilon": float(c.layer_norm_epsilon)}
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    meta = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "attention.key_length": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "attention.value_length": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.freq_base": float(rope["rope_theta"])}
    if getattr(c, "sliding_window", None) and arch.startswith("gemma"):
        meta["attention.sliding_window"] = int(c.sliding_window)
    if arch == "gemma2":
        meta["attn_logit_softcapping"] = float(c.attn_logit_softcapping)
        meta["final_logit_softcapping"] = float(c.final_logit_softcapping)
    if arch == "mixtral":
        meta.update({"expert_count": c.num_local_experts, "expert_used_count": c.num_experts_per_tok})
    elif hasattr(c, "num_experts"):
        meta.update({"expert_count": c.num_experts, "expert_used_count": c.num_experts_per_tok,
                     "expert_feed_forward_length": c.moe_intermediate_size})
        if arch == "qwen2moe":
            meta["expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    return meta


# Mixtral is written as general.architecture llama
GGUF_ARCH = {"mixtral": "llama"}


def _permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for its rope: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch: str, model) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, transformed as llama.cpp's converter stores them (float32)."""
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == GGUF_ARCH.get(arch, arch))
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    tied = model.config.tie_word_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        base, _, kind = name.rpartition(".")
        if base == "lm_head" and tied:
            continue
        t = tensor.detach().float()
        parts = {base: t}
        if base.endswith("experts.gate_up_proj") or name.endswith("experts.gate_up_proj"):
            base = name.removesuffix(".weight")
            half = t.shape[1] // 2
            parts = {base.replace("gate_up_proj", "gate_proj"): t[:, :half],
                     base.replace("gate_up_proj", "up_proj"): t[:, half:]}
            kind = "weight"
        elif name.endswith("experts.down_proj"):
            parts, kind = {name: t}, "weight"
        for hf_base, value in parts.items():
            gguf_name = names.get_name(hf_base)
            if gguf_name is None:
                raise KeyError(f"{arch}: no GGUF name for {hf_base}")
            if arch == "gpt2" and value.dim() == 2 and hf_base.endswith(("c_attn", "c_proj", "c_fc")):
                value = value.T
            if arch.startswith("gemma") and gguf_name.endswith("norm"):
                value = value + 1
            if GGUF_ARCH.get(arch, arch) == "llama" and gguf_name.endswith(("attn_q", "attn_k")) and kind == "weight":
                c = model.config
                value = _permute_qk(value, c.num_attention_heads if gguf_name.endswith("q") else c.num_key_value_heads)
            if gguf_name.endswith("ffn_gate_inp_shexp"):
                value = value.reshape(-1)
            out[f"{gguf_name}.{kind}"] = np.ascontiguousarray(value.numpy())
    return out


def _quantize(name: str, value: np.ndarray, qtype: T):
    """``(raw or float array, raw_dtype)``: 1-D tensors and the routers stay float32, as llama.cpp keeps them."""
    if value.ndim == 1 or "ffn_gate_inp" in name or qtype == T.F32:
        return value, None
    rows = value.reshape(-1, value.shape[-1])
    if qtype == T.F16:
        return value.astype(np.float16), None
    if qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = encode(rows, qtype)
    else:
        raw = gguf.quants.quantize(rows, qtype)
    return raw.reshape(*value.shape[:-1], -1), qtype


def _type_of(name: str, qtype) -> T:
    """``qtype`` itself, or from a dict of name fragments → type (first match; the key "" is the default)."""
    if not isinstance(qtype, dict):
        return qtype
    return next(t for fragment, t in qtype.items() if fragment in name)


def write_gguf(path: str, arch: str, model, qtype, extra_metadata: dict | None = None) -> str:
    """Write ``model`` as a GGUF of ``qtype`` (one type, or a dict of tensor-name fragments → type)."""
    name = GGUF_ARCH.get(arch, arch)
    writer = gguf.GGUFWriter(path, name)
    for key, value in _metadata(arch, model.config).items():
        if isinstance(value, float):
            writer.add_float32(f"{name}.{key}", value)
        else:
            writer.add_uint32(f"{name}.{key}", int(value))
    for key, value in (extra_metadata or {}).items():
        writer.add_key_value(key, *value)
    for name, value in gguf_tensors(arch, model).items():
        data, raw_dtype = _quantize(name, value, _type_of(name, qtype))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


ARCHS = ["gemma", "gemma2", "gemma3", "phi3", "qwen3", "qwen2moe", "qwen3moe", "gpt2", "mixtral"]
QTYPES = [T.F16, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
__all__ = ["ARCHS", "QTYPES", "MODEL_ARCH", "tiny_config", "tiny_model", "write_gguf", "gguf_tensors"]
