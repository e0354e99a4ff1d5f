"""Adapters and arguments pagoda refuses: each a ValueError naming the option, with the engine still serving."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from pagoda.core.engine_args import EngineArgs
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8,
               skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=32).llm_engine


def _variant(source: str, tmp_path, name: str, config_changes=None, rename=None) -> str:
    target = tmp_path / name
    shutil.copytree(source, target)
    if config_changes:
        config = json.loads((target / "adapter_config.json").read_text())
        config.update(config_changes)
        (target / "adapter_config.json").write_text(json.dumps(config))
    if rename:
        tensors = load_file(target / "adapter_model.safetensors")
        save_file({k.replace(*rename): v for k, v in tensors.items()}, target / "adapter_model.safetensors")
    return str(target)


@pytest.mark.parametrize("changes,rename,message", [
    ({"use_dora": True}, None, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"bias": "all"}, None, "bias"),
    ({"r": 64}, None, "max_lora_rank"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, None, "target_modules"),
    ({"rank_pattern": {"q_proj": 4}}, None, "rank_pattern"),
    (None, ("q_proj", "fc_in"), "target_modules"),
    (None, ("layers.0.self_attn.q_proj", "lm_head"), "target_modules"),
])
def test_unsupported_adapters_are_errors_naming_the_option(engine, lora_adapters, tmp_path, changes, rename,
                                                           message):
    path = _variant(lora_adapters("llama", "a"), tmp_path, "bad", changes, rename)
    with pytest.raises(ValueError, match=message):
        engine.add_lora(LoRARequest("bad", 7, path))
    assert 7 not in engine.list_loras()
    with pytest.raises(ValueError, match=message):  # the same through a request: nothing is queued
        engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2),
                           lora_request=LoRARequest("bad", 7, path))
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_missing_directory_and_bad_arguments(engine, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        engine.add_lora(LoRARequest("none", 3, str(tmp_path)))
    with pytest.raises(ValueError, match="lora_int_id"):
        engine.pin_lora(42)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineArgs(enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_loras"):
        EngineArgs(enable_lora=True, max_loras=0)
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineArgs(enable_lora=True, max_lora_rank=0)


def test_lora_request_without_enable_lora(tiny_model_dir, lora_adapters):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", skip_tokenizer_init=True, max_model_len=64,
              num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=LoRARequest("a", 1, lora_adapters("llama", "a")))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.llm_engine.add_lora(LoRARequest("a", 1, lora_adapters("llama", "a")))
    with pytest.raises(ValueError, match="lora_request: got 2 for 1 prompts"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=[None, None])
    assert_all_blocks_free(llm)
