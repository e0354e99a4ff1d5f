"""Greedy generation of pagoda on the families' GGUF files against transformers on the same file's weights.

The reference is transformers' own model class with the tiny model's config (which pagoda reads back from the
metadata, see test_gguf_families.py) and the weights transformers dequantizes from the file (the gguf package's
dequantization for Gemma 1, which transformers does not read; Mixtral, which it does not read either, is written
in F32, so that its own weights are the file's). Agreement as test_gguf_generation.py defines it:
the same greedy tokens, chosen-token logprobs within LOGPROB_TOL, in float32. Architectures whose model class is
not registered yet are skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gguf.constants import GGMLQuantizationType as T

from .gguf_families import tiny_model, write_gguf
from .test_gguf_generation import LOGPROB_TOL, hf_greedy

# one quantization type per architecture, so that every K-quant runs through the engine at least once
CASES = [("qwen2", T.Q4_K), ("gemma", T.Q2_K), ("gemma2", T.Q3_K), ("gemma3", T.Q4_K), ("phi3", T.Q5_K),
         ("qwen3", T.Q6_K), ("qwen2moe", T.Q8_0), ("qwen3moe", T.Q5_K), ("gpt2", T.Q6_K), ("mixtral", T.F32)]
PROMPTS = [[5, 17, 300, 42, 7], [400, 3, 64, 64, 12, 500, 250, 1, 8]]
NUM_TOKENS = 8


def _registered(architecture: str) -> bool:
    from pagoda.plugins.registry import get_registry

    return architecture in get_registry().models


def _reference_weights(arch: str, model, path: str) -> dict[str, torch.Tensor]:
    if arch == "mixtral":  # transformers reads no Mixtral GGUF: an F32 file holds the model's own weights exactly
        return model.state_dict()
    if arch != "gemma":
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    # Gemma 1: the gguf package's names and dequantization, and the converter's + 1 on the norms taken back
    import gguf
    from gguf import GGUFReader, quants

    by_name = {t.name: torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
               for t in GGUFReader(path).tensors}
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    state = {}
    for hf_name in model.state_dict():
        base, _, kind = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is not None and f"{gguf_name}.{kind}" in by_name:
            value = by_name[f"{gguf_name}.{kind}"]
            state[hf_name] = value - 1 if gguf_name.endswith("norm") else value
    return state


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def test_greedy_equals_transformers_on_the_same_file(arch, qtype, tmp_path):
    model = tiny_model(arch)
    architecture = type(model).__name__
    if not _registered(architecture):
        pytest.skip(f"{architecture} has no pagoda model class yet")
    path = write_gguf(str(tmp_path / f"{arch}-{qtype.name}.gguf"), arch, model, qtype)
    reference = copy.deepcopy(model)
    state = {k: v.float().reshape(reference.state_dict()[k].shape) for k, v in
             _reference_weights(arch, model, path).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)

    from pagoda import LLM, SamplingParams

    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, detokenize=False, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
        ref_tokens, ref_logprobs = hf_greedy(reference, prompt, NUM_TOKENS)
        assert tokens == ref_tokens
        worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert worst < LOGPROB_TOL, f"chosen-token logprobs differ by up to {worst:.2e}"
