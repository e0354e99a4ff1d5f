"""EngineArgs: vLLM's names and defaults, CLI flags, and errors naming the bad argument."""

from __future__ import annotations

import argparse

import pytest

from pagoda import LLM
from pagoda.core.engine_args import EngineArgs
from pagoda.utils import FlexibleArgumentParser


def test_defaults_follow_vllm():
    args = EngineArgs()
    assert (args.block_size, args.max_num_seqs, args.enable_prefix_caching, args.gpu_memory_utilization,
            args.dtype, args.generation_config, args.seed) == (16, 256, True, 0.9, "auto", "auto", 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "float64"}, "dtype"),
    ({"block_size": 12}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"task": "dance"}, "task"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"distributed_executor_backend": "threads"}, "distributed_executor_backend"),
    ({"pipeline_parallel_size": 2, "distributed_executor_backend": "uni"}, "distributed_executor_backend"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 16, "max_model_len": 64}, "max_num_batched_tokens"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**kwargs)


def test_unknown_argument_is_named():
    with pytest.raises(ValueError, match="unknown engine argument.*max_num_sequences"):
        EngineArgs.from_kwargs(max_num_sequences=3)
    with pytest.raises(ValueError, match="bogus_flag"):
        LLM("whatever", bogus_flag=1)


def test_cli_flags_round_trip():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(["--model", "m", "--max_num_seqs", "8", "--no-enable-prefix-caching", "--dtype",
                            "float32", "--override-generation-config", '{"temperature": 0.5}'])
    args = EngineArgs.from_cli_args(ns)
    assert (args.model, args.max_num_seqs, args.enable_prefix_caching, args.dtype) == ("m", 8, False, "float32")
    assert args.override_generation_config == {"temperature": 0.5}
    with pytest.raises(SystemExit):
        EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--dtype", "float64"])


def test_model_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        LLM("some-org/some-model")


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*supported architectures: .*Gemma3ForCausalLM.*"
                                         "LlamaForCausalLM.*OPTForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


@pytest.mark.parametrize("usage_context", ["llm_class", "openai_api_server"])
def test_step_budget_defaults_to_the_platforms_choice_for_where_it_runs(tiny_model_dir, usage_context):
    from pagoda.core.config import EngineConfig
    from pagoda.platforms import resolve_platform

    model = tiny_model_dir("llama")
    config = EngineConfig.from_engine_args(EngineArgs(model=model, usage_context=usage_context))
    expected = resolve_platform("auto").default_max_num_batched_tokens(usage_context)
    assert config.scheduler.max_num_batched_tokens == expected
    given = EngineArgs(model=model, usage_context=usage_context, max_num_batched_tokens=333)
    assert EngineConfig.from_engine_args(given).scheduler.max_num_batched_tokens == 333


@pytest.mark.parametrize("amx", [False, True])
def test_cpu_serves_in_smaller_steps_than_it_runs_offline_unless_prefill_runs_on_amx(monkeypatch, amx):
    from pagoda.platforms.cpu import CpuPlatform

    flags = frozenset({"avx512f", "avx512_bf16"} | ({"amx_tile", "amx_bf16"} if amx else set()))
    monkeypatch.setattr(CpuPlatform, "capabilities", classmethod(lambda cls: flags))
    assert CpuPlatform.default_max_num_batched_tokens("openai_api_server") == (2048 if amx else 1024)
    assert CpuPlatform.default_max_num_batched_tokens("llm_class") == 2048


def test_usage_context_is_checked_and_not_a_flag():
    with pytest.raises(ValueError, match="usage_context.*llm_class, openai_api_server"):
        EngineArgs(usage_context="batch")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--usage-context", "openai_api_server"])
    assert EngineArgs.from_cli_args(parser.parse_args([]), usage_context="openai_api_server").usage_context == \
        "openai_api_server"
