"""Multi-LoRA serving against transformers + peft (float32 greedy) on the tiny random models: each adapter alone,
one batch mixing four adapters and the base model through two slots, rsLoRA, target-module subsets, adapters
added and removed while requests run, and the prefix cache kept apart per adapter."""

from __future__ import annotations

import pytest

from tests.conftest import assert_all_blocks_free
from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.lora.conftest import peft_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
                                                    57, 58], [300, 301], [7, 8]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _llm(model_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("max_loras", 2)
    return LLM(model_dir, dtype="float32", enable_lora=True, skip_tokenizer_init=True, max_model_len=128,
               num_gpu_blocks_override=96, **kwargs)


def _generate(llm: LLM, prompts, loras) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=loras)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _assert_slots_consistent(llm: LLM) -> None:
    manager = llm.llm_engine.runner.lora
    held = [i for i in manager.slot_ids if i is not None]
    assert len(held) == len(set(held)) <= manager.config.max_loras
    assert manager.step.plan is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_each_adapter_alone_matches_peft(kind, tiny_model_dir, lora_adapters):
    base = tiny_model_dir(kind)
    adapters = [lora_adapters(kind, "a"), lora_adapters(kind, "b", r=4, alpha=8)]
    llm = _llm(base, max_loras=1)
    prompts = PROMPTS[:3]
    for i, path in enumerate(adapters):
        got = _generate(llm, prompts, LoRARequest(f"ad{i}", i + 1, path))
        assert got == peft_greedy(base, path, prompts, GREEDY.max_tokens), f"adapter {i}"
    assert _generate(llm, prompts, None) == peft_greedy(base, None, prompts, GREEDY.max_tokens)
    assert_all_blocks_free(llm)
    _assert_slots_consistent(llm)


def test_mixed_batch_of_four_adapters_and_base_through_two_slots(tiny_model_dir, lora_adapters):
    base = tiny_model_dir("llama")
    paths = [lora_adapters("llama", "a"), lora_adapters("llama", "b", r=4, alpha=8),
             lora_adapters("llama", "c", r=16, alpha=16), lora_adapters("llama", "d", r=2, alpha=4)]
    loras = [LoRARequest(f"ad{i}", i + 1, p) for i, p in enumerate(paths)]
    # Four adapters, two slots, three host entries: slots are evicted and refilled, host copies read again.
    llm = _llm(base, max_loras=2, max_cpu_loras=3)
    prompts = PROMPTS + PROMPTS[:3]
    per_prompt = [loras[0], loras[1], loras[2], loras[3], None, loras[2], None, loras[0]]
    got = _generate(llm, prompts, per_prompt)
    expected = {}
    for prompt, lora, out in zip(prompts, per_prompt, got):
        key = None if lora is None else lora.lora_path
        if key not in expected:
            subset = [p for p, l in zip(prompts, per_prompt) if (None if l is None else l.lora_path) == key]
            expected[key] = dict(zip(map(tuple, subset), peft_greedy(base, key, subset, GREEDY.max_tokens)))
        assert out == expected[key][tuple(prompt)], f"prompt {prompt} with {lora}"
    assert len(llm.llm_engine.list_loras()) <= 3
    assert_all_blocks_free(llm)
    _assert_slots_consistent(llm)


def test_rslora_and_target_subsets(tiny_model_dir, lora_adapters):
    base = tiny_model_dir("llama")
    paths = [lora_adapters("llama", "rs", r=8, alpha=4, use_rslora=True),
             lora_adapters("llama", "qv", target_modules=("q_proj", "v_proj")),
             lora_adapters("llama", "mlp", target_modules=("down_proj", "up_proj")),
             lora_adapters("llama", "all", target_modules="all-linear")]
    llm = _llm(base, max_loras=4)
    prompts = PROMPTS[:2]
    for i, path in enumerate(paths):
        got = _generate(llm, prompts, LoRARequest(f"ad{i}", i + 1, path))
        assert got == peft_greedy(base, path, prompts, GREEDY.max_tokens), path
    assert_all_blocks_free(llm)


def test_add_and_remove_under_load(tiny_model_dir, lora_adapters):
    base = tiny_model_dir("llama")
    a, b = lora_adapters("llama", "a"), lora_adapters("llama", "b", r=4, alpha=8)
    llm = _llm(base, max_loras=1, max_cpu_loras=1)
    engine = llm.llm_engine
    lora_a, lora_b = LoRARequest("a", 1, a), LoRARequest("b", 2, b)
    assert engine.add_lora(lora_a) and engine.list_loras() == {1}
    assert engine.pin_lora(1)
    assert engine.add_lora(lora_b) and engine.list_loras() == {1, 2}  # pinned: kept beyond max_cpu_loras
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(zip(PROMPTS[:4], [lora_a, lora_b, None, lora_a])):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params, lora_request=lora)
    outputs, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            assert engine.remove_lora(2)  # still in use: its requests read it again from its path
            assert 2 not in engine.list_loras()
    for i, (prompt, path) in enumerate(zip(PROMPTS[:4], [a, b, None, a])):
        assert outputs[str(i)] == peft_greedy(base, path, [prompt], 8)[0]
    assert not engine.remove_lora(99)
    assert_all_blocks_free(llm)
    _assert_slots_consistent(llm)
    for lora_id in engine.list_loras():
        assert engine.remove_lora(lora_id)
    assert engine.list_loras() == set() and engine.runner.lora.num_free_slots == 1  # every slot back to free


def test_prefix_cache_never_shared_between_adapters(tiny_model_dir, lora_adapters):
    base = tiny_model_dir("llama")
    a, b = lora_adapters("llama", "a"), lora_adapters("llama", "b", r=4, alpha=8)
    llm = _llm(base, max_loras=2)
    prompt = list(range(100, 150))  # three full blocks of 16
    results = {}
    for name, lora in [("a", LoRARequest("a", 1, a)), ("b", LoRARequest("b", 2, b)), ("base", None),
                       ("a again", LoRARequest("a", 1, a))]:
        out = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False, lora_request=lora)[0]
        results[name] = (out.num_cached_tokens, list(out.outputs[0].token_ids))
    assert results["a"][0] == 0 and results["b"][0] == 0 and results["base"][0] == 0
    assert results["a again"][0] == 48 and results["a again"][1] == results["a"][1]
    assert results["b"][1] == peft_greedy(base, b, [prompt], GREEDY.max_tokens)[0]
    assert results["base"][1] == peft_greedy(base, None, [prompt], GREEDY.max_tokens)[0]
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_budget_counts_the_adapter_slots_the_engine_allocates(tiny_model_dir, dtype):
    """The KV-cache budget on device platforms leaves room for the slots: what it counts is what they take."""
    from pagoda.lora.manager import lora_device_bytes

    llm = LLM(tiny_model_dir("llama"), dtype=dtype, enable_lora=True, max_loras=3, max_lora_rank=16,
              skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=16)
    engine = llm.llm_engine
    manager = engine.runner.lora
    allocated = sum(layer.slots.nbytes() for layer in manager.layers.values())
    layers = len(engine.runner.model.model.layers)
    assert allocated > 0 and len(manager.layers) == 4 * layers
    assert engine.config.ops.lora_shrink_expand is manager.step.op
    assert lora_device_bytes(engine.config, engine.runner.model, engine.config.ops) == allocated
