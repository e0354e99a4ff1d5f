"""bf16 with the platform's fused decode step. With the native ``lora_shrink_expand`` the decode steps that have
adapter rows run fused too, and give exactly the tokens of the layer-by-layer path (the same kernels, in the same
order); with a torch implementation of the op those steps decline the fused step and the steps after them get it
back. Either way, the adapter rows of a mixed batch equal the adapter run on its own, and the base rows equal the
base model run on its own."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.platforms import resolve_platform
from pagoda.plugins.registry import get_registry
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43]]


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _count_fused_lora_steps(runner):
    """Wraps the fused step's ``run`` (the real one still runs) to count the calls made while rows had adapters."""
    fused, calls = runner.fused_decode, []
    run = fused.run

    def counting_run(*args, **kwargs):
        calls.append(runner.lora.step.plan is not None)
        return run(*args, **kwargs)

    fused.run = counting_run
    return calls


@pytest.mark.parametrize("impl", [None, "cpu_avx512_bf16", "torch_all_slots"])
def test_lora_decode_steps_fused_or_declined_and_agree_with_single_runs(tiny_model_dir, lora_adapters, impl):
    """``impl``: the lora_shrink_expand implementation forced (None: the platform's choice; cpu_avx512_bf16 on an
    AMX CPU: the native kernel without tiles, which the fused step must then not use either)."""
    if impl is not None:
        reason = get_registry().ops["lora_shrink_expand"][impl].unavailable_reason(resolve_platform("auto"),
                                                                                  torch.bfloat16)
        if reason:
            pytest.skip(f"lora_shrink_expand/{impl}: {reason}")
    llm = LLM(tiny_model_dir("llama"), dtype="bfloat16", enable_lora=True, max_loras=2, skip_tokenizer_init=True,
              max_model_len=128, num_gpu_blocks_override=64,
              op_impl=f"lora_shrink_expand={impl}" if impl else None)
    runner = llm.llm_engine.runner
    if runner.fused_decode is None:
        pytest.skip("this platform fuses no decode step for the tiny model in bf16")
    native = runner.fused_decode.lora_fused
    if impl is None and not native:
        pytest.skip(f"lora_shrink_expand is {type(runner.lora.step.op).name}, not a native kernel")
    assert native == (impl != "torch_all_slots")
    assert runner.fused_decode.plan.lora_amx == int(native and runner.lora.step.op.uses_amx)
    lora = LoRARequest("a", 1, lora_adapters("llama", "a"))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    calls = _count_fused_lora_steps(runner)
    runner.fused_decode.profile(True)
    mixed = _tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=[lora, None, lora]))
    lora_seconds = runner.fused_decode.take_phase_times()["lora"]
    runner.fused_decode.profile(False)
    assert any(calls) == native and (native or calls == [])  # declined: every step of this batch has adapter rows
    assert (lora_seconds > 0) == native  # the fused steps time the adapter deltas as a phase of their own
    assert runner.model.model.fused_decode is runner.fused_decode
    alone = _tokens(llm.generate([prompts[0], prompts[2]], params, use_tqdm=False, lora_request=lora))
    base = _tokens(llm.generate([prompts[1]], params, use_tqdm=False))
    assert [mixed[0], mixed[2]] == alone and [mixed[1]] == base
    assert mixed[0] != _tokens(llm.generate([prompts[0]], params, use_tqdm=False))[0]  # the adapter does something
    runner.model.use_fused_decode(None)  # layer by layer: the same kernels one op at a time
    try:
        assert _tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=[lora, None, lora])) == mixed
    finally:
        runner.model.use_fused_decode(runner.fused_decode)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", ["opt", "qwen2_moe"])
def test_lora_decode_steps_of_other_recipes_fused_equal_layer_by_layer(tiny_model_dir, monkeypatch, tmp_path,
                                                                         family):
    """OPT (the "gpt" recipe: LayerNorm with biases, no rotary) with an adapter on q, k and v (OPT's LoRA-capable
    layers), and Qwen2-MoE with one on its dense layer's and its sparse layer's shared expert's MLP projections (named
    in full: from PEFT 0.22 the bare names also adapt the routed experts, whose steps run layer by layer): the fused
    steps with adapter rows give the layer-by-layer path's tokens."""
    from transformers import OPTConfig

    from pagoda.platforms.cpu import ops as cpu_op_impls
    from tests.lora.conftest import make_peft_adapter
    from tests.models.checkpoint_variants import randomize_vectors
    from tests.models.test_moe import qwen2_moe_config
    from tests.models.test_opt import KINDS, TINY

    if family == "opt":
        # Small batches' LayerNorm runs the native kernel per op too, as in the fused step (see test_fused_decode).
        monkeypatch.setattr(cpu_op_impls, "LAYER_NORM_MIN_ELEMENTS", 0)
        base = tiny_model_dir("opt_pre_norm", OPTConfig(**TINY, **KINDS["opt_pre_norm"]))
        targets = ("q_proj", "k_proj", "v_proj")
    else:
        base = randomize_vectors(tiny_model_dir("qwen2_moe", qwen2_moe_config()))
        targets = tuple(f"{block}.{proj}" for block in ("layers.0.mlp", "shared_expert")
                        for proj in ("gate_proj", "up_proj", "down_proj"))
    adapter = make_peft_adapter(base, str(tmp_path / "adapter"), 7, target_modules=targets)
    llm = LLM(base, dtype="bfloat16", enable_lora=True, max_loras=2, skip_tokenizer_init=True, max_model_len=128,
              num_gpu_blocks_override=64)
    runner = llm.llm_engine.runner
    if runner.fused_decode is None or not runner.fused_decode.lora_fused:
        pytest.skip(f"this platform fuses no decode step with adapters for the tiny {family} in bf16")
    lora = LoRARequest("a", 1, adapter)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    calls = _count_fused_lora_steps(runner)
    fused = _tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=[lora, None, lora]))
    assert any(calls)
    assert fused[0] != _tokens(llm.generate([prompts[0]], params, use_tqdm=False))[0]  # the adapter does something
    runner.model.use_fused_decode(None)
    try:
        assert _tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=[lora, None, lora])) == fused
    finally:
        runner.model.use_fused_decode(runner.fused_decode)
    assert_all_blocks_free(llm)
