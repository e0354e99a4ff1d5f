"""LoRA on a mixture-of-experts model's routed experts (Qwen2-MoE, Mixtral, Qwen3-MoE), against transformers + peft
running the same adapter: PEFT's stacked-parameter form (``target_parameters``, what PEFT 0.22 also makes of
``target_modules`` naming the MLP projections) and the per-expert form, mixed with base rows and other adapters;
per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``) on the linears; and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free
from tests.lora.conftest import make_peft_adapter, peft_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ["gate_up_proj", "down_proj"]
PEFT_NAMES = ("gate_proj", "up_proj", "down_proj")


def _config(family: str):
    from tests.models.test_moe import CONFIGS

    return CONFIGS[family]()


def _generate(llm: LLM, prompts, loras, params=GREEDY) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe"])
def test_routed_expert_adapters_equal_peft(tiny_model_dir, tmp_path, family):
    base = tiny_model_dir(family, _config(family))
    experts_only = make_peft_adapter(base, str(tmp_path / "experts"), 11, target_modules=[],
                                     target_parameters=EXPERTS)
    with_attention = make_peft_adapter(base, str(tmp_path / "both"), 12, r=4, alpha=8, target_modules=ATTENTION,
                                       target_parameters=EXPERTS)
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, skip_tokenizer_init=True,
              max_model_len=128, num_gpu_blocks_override=64)
    for i, path in enumerate((experts_only, with_attention)):
        got = _generate(llm, PROMPTS, LoRARequest(f"a{i}", i + 1, path))
        assert got == peft_greedy(base, path, PROMPTS, GREEDY.max_tokens), path
    base_tokens = peft_greedy(base, None, PROMPTS, GREEDY.max_tokens)
    assert _generate(llm, PROMPTS, LoRARequest("a0", 1, experts_only))[0] != base_tokens[0]  # it does something
    mixed = _generate(llm, PROMPTS, [LoRARequest("a0", 1, experts_only), None, LoRARequest("a1", 2, with_attention)])
    assert mixed[1] == base_tokens[1]
    assert mixed[0] == _generate(llm, PROMPTS[:1], LoRARequest("a0", 1, experts_only))[0]
    assert mixed[2] == _generate(llm, PROMPTS[2:], LoRARequest("a1", 2, with_attention))[0]
    assert_all_blocks_free(llm)


def _per_expert_form(source: str, out, config, names=PEFT_NAMES, saved_block=None) -> str:
    """``source``'s stacked-parameter expert LoRA rewritten per expert (gate and up each keep the fused A and their
    own rows of B: the same deltas), as PEFT saved adapters for models whose experts were modules; ``names``: the
    gate, up and down modules' names, ``saved_block(path)``: an experts block's path as saved."""
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    hidden, inter = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    out.mkdir()
    tensors = load_file(f"{source}/adapter_model.safetensors")
    config = json.loads(open(f"{source}/adapter_config.json").read())
    rewritten = {k: v for k, v in tensors.items() if ".experts." not in k}
    blocks = {k.split(".experts.")[0] + ".experts" for k in tensors if ".experts." in k}
    for block in blocks:
        saved = saved_block(block) if saved_block else block
        for key in (f"{block}.base_layer", block):  # one wrapper inside the other, in PEFT's order
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            rank = a.shape[0] // num_experts
            a_e, b_e = a.reshape(num_experts, rank, -1), b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)
            gate_up = (a.shape[1], b.shape[0]) == (hidden, 2 * inter)  # else down: (inter, hidden)
            parts = (((names[0], slice(0, inter)), (names[1], slice(inter, 2 * inter))) if gate_up
                     else ((names[2], slice(None)),))
            for e in range(num_experts):
                for leaf, rows in parts:
                    rewritten[f"{saved}.{e}.{leaf}.lora_A.weight"] = a_e[e].clone()
                    rewritten[f"{saved}.{e}.{leaf}.lora_B.weight"] = b_e[e][rows].contiguous()
    save_file(rewritten, str(out / "adapter_model.safetensors"))
    config["target_parameters"] = None
    (out / "adapter_config.json").write_text(json.dumps(config))
    return str(out)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_per_expert_adapters_equal_the_stacked_form(tiny_model_dir, tmp_path, family):
    """Qwen2-MoE's gate_proj / up_proj / down_proj, and Mixtral's w1 / w3 / w2 under transformers 4's
    ``block_sparse_moe``."""
    config = _config(family)
    base = tiny_model_dir(family, config)
    stacked = make_peft_adapter(base, str(tmp_path / "stacked"), 13, r=4, alpha=8, target_modules=[],
                                target_parameters=EXPERTS)
    if family == "mixtral":
        per_expert = _per_expert_form(stacked, tmp_path / "per_expert", config, ("w1", "w3", "w2"),
                                      lambda block: block.replace(".mlp.", ".block_sparse_moe."))
    else:
        per_expert = _per_expert_form(stacked, tmp_path / "per_expert", config)
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=4, skip_tokenizer_init=True,
              max_model_len=128, num_gpu_blocks_override=64)
    want = _generate(llm, PROMPTS, LoRARequest("s", 1, stacked))
    assert _generate(llm, PROMPTS, LoRARequest("p", 2, per_expert)) == want
    assert want == peft_greedy(base, stacked, PROMPTS, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_memory_budget_counts_the_experts_slots(tiny_model_dir):
    from pagoda.lora.manager import lora_device_bytes

    llm = LLM(tiny_model_dir("qwen2_moe", _config("qwen2_moe")), dtype="bfloat16", enable_lora=True, max_loras=2,
              max_lora_rank=8, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=16)
    engine = llm.llm_engine
    manager = engine.runner.lora
    linears = sum(layer.slots.nbytes() for layer in manager.layers.values())
    experts = sum(t.numel() * t.element_size() for lora, _ in manager.experts.values()
                  for t in (lora.a13, lora.bt13, lora.a2, lora.bt2, lora.adapted_mask))
    assert len(manager.experts) == 1 and experts > 0
    assert lora_device_bytes(engine.config, engine.runner.model, engine.config.ops) == linears + experts


def test_expert_rows_in_bf16_run_fused_equal_layer_by_layer_and_single_runs(tiny_model_dir, tmp_path):
    """bf16, two expert adapters and a base row in one batch: where the platform fuses decode steps with adapters,
    the steps with expert rows run fused (the experts' deltas inside the native mixture) and give the layer-by-layer
    path's tokens; either way each row equals its adapter (or the base model) run on its own."""
    base = tiny_model_dir("qwen2_moe", _config("qwen2_moe"))
    first = make_peft_adapter(base, str(tmp_path / "a"), 14, target_modules=ATTENTION, target_parameters=EXPERTS)
    second = make_peft_adapter(base, str(tmp_path / "b"), 17, target_modules=[], target_parameters=EXPERTS)
    llm = LLM(base, dtype="bfloat16", enable_lora=True, max_loras=2, skip_tokenizer_init=True, max_model_len=128,
              num_gpu_blocks_override=64)
    runner = llm.llm_engine.runner
    fused = runner.fused_decode is not None and runner.fused_decode.lora_fused
    fused_expert_steps = []
    if fused:  # count the fused steps whose rows adapt routed experts (the real step still runs)
        run = runner.fused_decode.run

        def counting_run(*args, **kwargs):
            fused_expert_steps.append(runner.lora.step.experts_active)
            return run(*args, **kwargs)

        runner.fused_decode.run = counting_run
    a, b = LoRARequest("a", 1, first), LoRARequest("b", 2, second)
    mixed = _generate(llm, PROMPTS, [a, None, b])
    assert any(fused_expert_steps) == fused
    assert [mixed[0]] == _generate(llm, [PROMPTS[0]], a) and [mixed[2]] == _generate(llm, [PROMPTS[2]], b)
    assert [mixed[1]] == _generate(llm, [PROMPTS[1]], None)
    assert mixed[0] != _generate(llm, [PROMPTS[0]], None)[0] and mixed[2] != _generate(llm, [PROMPTS[2]], None)[0]
    if fused:
        runner.model.use_fused_decode(None)  # layer by layer: the same native mixture, one op at a time
        try:
            assert _generate(llm, PROMPTS, [a, None, b]) == mixed
        finally:
            runner.model.use_fused_decode(runner.fused_decode)
    assert_all_blocks_free(llm)


def test_rank_and_alpha_patterns_equal_peft(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    adapter = make_peft_adapter(base, str(tmp_path / "patterns"), 15, r=4, alpha=8,
                                rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"o_proj": 32, "q_proj": 4})
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, skip_tokenizer_init=True,
              max_model_len=128, num_gpu_blocks_override=64)
    assert _generate(llm, PROMPTS, LoRARequest("p", 1, adapter)) == peft_greedy(base, adapter, PROMPTS,
                                                                                 GREEDY.max_tokens)
    with pytest.raises(ValueError, match="rank_pattern"):  # a module's rank above max_lora_rank
        LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4, skip_tokenizer_init=True,
            max_model_len=64, num_gpu_blocks_override=16).llm_engine.add_lora(LoRARequest("p", 1, adapter))


def test_expert_adapter_errors(tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2_moe", _config("qwen2_moe"))
    adapter = make_peft_adapter(base, str(tmp_path / "a"), 16, r=4, alpha=8, target_modules=[],
                                target_parameters=EXPERTS, rank_pattern={"down_proj": 6, "gate_up_proj": 8})
    engine = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4, skip_tokenizer_init=True,
                 max_model_len=64, num_gpu_blocks_override=16).llm_engine
    with pytest.raises(ValueError, match=r"down_proj with rank 6, above 4"):  # gate-up takes 2 x 4 (8), down 4
        engine.add_lora(LoRARequest("a", 1, adapter))
    llama = LLM(tiny_model_dir("llama"), dtype="float32", enable_lora=True, max_loras=1, skip_tokenizer_init=True,
                max_model_len=64, num_gpu_blocks_override=16).llm_engine
    with pytest.raises(ValueError, match="target_parameters.*routed experts"):
        llama.add_lora(LoRARequest("a", 1, adapter))
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(f"{adapter}/adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("experts.lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    (broken / "adapter_config.json").write_text(open(f"{adapter}/adapter_config.json").read())
    engine8 = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, skip_tokenizer_init=True,
                  max_model_len=64, num_gpu_blocks_override=16).llm_engine
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts"):
        engine8.add_lora(LoRARequest("b", 2, str(broken)))
    assert not engine8.list_loras()
