"""GGUF files of the model families (Gemma 1/2/3, Phi-3, Qwen3, Qwen2/3-MoE, GPT-2) in every K-quant type, F16 and
Q8_0, written from tiny transformers models: the config pagoda reads from the metadata, and the tensors it yields
(dequantized) against transformers' own GGUF loading of the same file and against the original weights."""

from __future__ import annotations

import pytest
import torch
from gguf.constants import GGMLQuantizationType as T

from pagoda.quantization.gguf import GGUFCheckpoint, GGUFError, GGUFWeight

from .gguf_families import ARCHS, QTYPES, tiny_model, write_gguf

# The largest difference from the original weights, relative to each tensor's largest magnitude: about a step of
# each type's grid (the test encoder uses one scale per 256 values for the K-quants; llama.cpp's are finer).
STEP = {T.F16: 1e-3, T.Q8_0: 1e-2, T.Q6_K: 0.04, T.Q5_K: 0.08, T.Q4_K: 0.15, T.Q3_K: 0.3, T.Q2_K: 0.35}
# transformers reads no Gemma 1 GGUF (its GGUF table starts at Gemma 2), nor Mixtral (a llama file with experts)
TRANSFORMERS_READS = set(ARCHS) - {"gemma", "mixtral"}
# Mixtral's checkpoint names (pagoda's loader takes them) → transformers 5's
_MIXTRAL_NAMES = {".block_sparse_moe.experts.": ".mlp.experts.", ".block_sparse_moe.gate.": ".mlp.gate.",
                  ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ARCHS}


def _pagoda_tensors(path: str) -> dict[str, torch.Tensor]:
    config = GGUFCheckpoint.load_hf_config(path)
    out = {}
    for name, value in GGUFCheckpoint.iter_weights(path, config):
        out[name] = value.dequantize() if isinstance(value, GGUFWeight) else value.float()
    return out


def _as_hf_layout(arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pagoda's per-expert weights stacked as transformers' fused expert parameters, GPT-2's linear weights back
    to Conv1D's [in, out]: the layout of the HF state dict."""
    out, experts = {}, {}
    for name, value in tensors.items():
        for old, new in _MIXTRAL_NAMES.items():
            name = name.replace(old, new)
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            index, proj, _ = rest.split(".")
            experts.setdefault((prefix, proj), {})[int(index)] = value
            continue
        if arch == "gpt2" and value.dim() == 2 and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.T
        out[name] = value
    stacks = {key: torch.stack([by_index[i] for i in sorted(by_index)]) for key, by_index in experts.items()}
    for prefix in {prefix for prefix, _ in stacks}:
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stacks[prefix, "gate_proj"], stacks[prefix, "up_proj"]],
                                                              dim=1)
        out[f"{prefix}.mlp.experts.down_proj"] = stacks[prefix, "down_proj"]
    return out


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_match_transformers_and_the_original_weights(arch, qtype, models, tmp_path):
    model = models[arch]
    path = write_gguf(str(tmp_path / f"{arch}-{qtype.name}.gguf"), arch, model, qtype)
    ours = _as_hf_layout(arch, _pagoda_tensors(path))
    original = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert sorted(ours) == sorted(original)
    for name, value in ours.items():
        want = original[name].float()
        assert value.shape == want.shape, name
        bound = STEP[qtype] * want.abs().max().item() if value.dim() > 1 and "mlp.gate." not in name else 1e-6
        assert (value - want).abs().max().item() <= bound + 1e-6, f"{name}: {(value - want).abs().max():.3g}"
    if arch in TRANSFORMERS_READS:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        assert sorted(theirs) == sorted(ours)
        for name, value in theirs.items():
            # the same dequantization of the same bytes, the same converter transformations undone
            assert torch.equal(ours[name], value.float().reshape(ours[name].shape)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_metadata(arch, models, tmp_path):
    model = models[arch]
    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, model, T.F16)
    ours, theirs = GGUFCheckpoint.load_hf_config(path), model.config
    assert ours.model_type == theirs.model_type and ours.architectures == [type(model).__name__]
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_word_embeddings"]
    keys += {"gpt2": ["n_inner", "n_positions", "layer_norm_epsilon"]}.get(arch, [
        "num_key_value_heads", "intermediate_size", "head_dim", "rms_norm_eps", "max_position_embeddings"])
    keys += {"gemma2": ["sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping", "layer_types"],
             "gemma3": ["sliding_window", "query_pre_attn_scalar", "layer_types", "rope_parameters"],
             "qwen2moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                          "shared_expert_intermediate_size", "norm_topk_prob"],
             "qwen3moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"],
             "mixtral": ["num_local_experts", "num_experts_per_tok"],
             }.get(arch, [])
    for key in keys:
        if getattr(theirs, key, None) is None:  # head_dim: not set in every config class
            continue
        a, b = getattr(ours, key), getattr(theirs, key)
        assert a == pytest.approx(b) if isinstance(b, float) else a == b, (key, a, b)


def test_unknown_expert_tensor_is_an_error_naming_it(models, tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "bad.gguf")
    writer = gguf.GGUFWriter(path, "qwen3")
    for key, value in {"embedding_length": 256, "block_count": 1, "feed_forward_length": 512,
                       "attention.head_count": 4, "vocab_size": 1024}.items():
        writer.add_uint32(f"qwen3.{key}", value)
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 4, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = GGUFCheckpoint.load_hf_config(path)
    with pytest.raises(GGUFError, match="ffn_gate_exps.*qwen3"):
        list(GGUFCheckpoint.iter_weights(path, config))


def test_gpt2_head_written_as_a_copy_of_the_embedding_is_tied(models, tmp_path):
    """llama.cpp's GPT-2 converter writes the tied LM head out again as output.weight: read as tied."""
    import gguf

    from .gguf_families import gguf_tensors

    path = str(tmp_path / "gpt2-copied-head.gguf")
    tensors = gguf_tensors("gpt2", models["gpt2"])
    tensors["output.weight"] = tensors["token_embd.weight"].copy()
    writer = gguf.GGUFWriter(path, "gpt2")
    for key, value in {"embedding_length": 256, "block_count": 2, "feed_forward_length": 256,
                       "attention.head_count": 4, "context_length": 256}.items():
        writer.add_uint32(f"gpt2.{key}", value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = GGUFCheckpoint.load_hf_config(path)
    assert config.tie_word_embeddings
    assert "lm_head.weight" not in dict(GGUFCheckpoint.iter_weights(path, config))
