"""An out-of-tree op implementation (the example accelerator's RMSNorm): chosen by priority, forced, put aside
by a forced choice, and refused with its reason where it can't run — and used by a real engine."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.ops import select_ops
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import reset_registry
from tests.conftest import hf_greedy


@pytest.fixture
def registry(load_registry, monkeypatch):
    monkeypatch.delenv("PAGODA_OP_IMPL", raising=False)
    return load_registry()


def test_registered_with_its_plugin(registry):
    assert registry.owner_of("op:rms_norm", "example_rms_norm") == "example_accelerator"
    assert set(registry.ops["rms_norm"]) >= {"torch", "example_rms_norm"}


def test_chosen_by_priority_where_it_can_run(registry):
    cpu = resolve_platform("cpu", registry)
    choice = select_ops(cpu, torch.float32, registry=registry).choices["rms_norm"]
    assert (choice.chosen, choice.forced) == ("example_rms_norm", False)
    assert ("torch", "lower priority here (0 < 50)") in choice.passed_over


def test_a_forced_choice_puts_it_aside(registry, monkeypatch):
    cpu = resolve_platform("cpu", registry)
    ops = select_ops(cpu, torch.float32, "rms_norm=torch", registry=registry)
    assert ops.choices["rms_norm"].chosen == "torch" and ops.choices["rms_norm"].forced
    assert ("example_rms_norm", "not in op_impl rms_norm=torch") in ops.choices["rms_norm"].passed_over
    monkeypatch.setenv("PAGODA_OP_IMPL", "rms_norm=torch")  # the variable does the same
    assert select_ops(cpu, torch.float32, registry=registry).choices["rms_norm"].chosen == "torch"
    # The flag wins over the variable, op by op.
    forced = select_ops(cpu, torch.float32, "rms_norm=example_rms_norm", registry=registry)
    assert forced.choices["rms_norm"].chosen == "example_rms_norm"


def test_forcing_it_where_it_cannot_run_is_an_error_with_its_reason(registry):
    cpu = resolve_platform("cpu", registry)
    with pytest.raises(ValueError, match=r"op_impl: rms_norm=example_rms_norm can't run on platform cpu: "
                                         r"example_rms_norm: computes in float32 only, not bfloat16"):
        select_ops(cpu, torch.bfloat16, "rms_norm=example_rms_norm", registry=registry)
    # In bf16, unforced, the engine passes it over with the same reason.
    choice = select_ops(cpu, torch.bfloat16, registry=registry).choices["rms_norm"]
    assert choice.chosen != "example_rms_norm"
    assert ("example_rms_norm", "computes in float32 only, not bfloat16") in choice.passed_over


def test_an_engine_runs_it_and_still_matches_transformers(with_plugins, tiny_model_dir):
    from pagoda_example_accelerator.ops import ExampleRmsNorm

    reset_registry()
    try:
        path = tiny_model_dir("llama")
        rng = random.Random(5)
        prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (3, 11)]
        llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22, device="cpu")
        assert llm.llm_engine.config.ops.choices["rms_norm"].chosen == "example_rms_norm"
        ExampleRmsNorm.calls = 0
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert ExampleRmsNorm.calls > 0
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, prompts, 6)
    finally:
        reset_registry()
