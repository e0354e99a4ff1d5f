"""Weights load from sharded safetensors (with the index file) and from pytorch_model.bin alike."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free, hf_greedy

PROMPT = [5, 17, 99, 4, 250, 3, 8, 13]


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_bin"])
def test_weight_file_layouts(tiny_model_dir, tmp_path, layout):
    source = tiny_model_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(source)
    if layout == "sharded_safetensors":
        model.save_pretrained(tmp_path, max_shard_size="100KB")
        with open(tmp_path / "model.safetensors.index.json") as f:
            assert len(set(json.load(f)["weight_map"].values())) > 1
    else:  # transformers 5 only writes safetensors: write the classic pickle checkpoint directly
        import torch

        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        assert (tmp_path / "pytorch_model.bin").exists() and not any(
            name.endswith(".safetensors") for name in os.listdir(tmp_path))
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(source, [PROMPT], 6)[0]
    assert_all_blocks_free(llm)


def test_missing_weights_are_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_model_dir("llama")
    for name in os.listdir(source):
        if name.endswith(".json"):
            (tmp_path / name).write_bytes(open(os.path.join(source, name), "rb").read())
    tensors = load_file(os.path.join(source, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights for: model.layers.1.mlp.down_proj.weight"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
