"""Fused CPU decode steps compute exactly what the per-op path computes (same kernels, same order): the Llama recipe
(dense, GGUF and quantized checkpoints, routed experts), Gemma's and the GPT-style one (OPT, GPT-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.platforms.cpu import ops as cpu_op_impls
from pagoda.platforms.cpu.kernels import cpu
from tests.conftest import assert_all_blocks_free, bundled_gguf_path
from tests.models.checkpoint_variants import randomize_vectors
from tests.models.test_gemma import gemma_dir  # noqa: F401  (a fixture)
from tests.models.test_gpt2 import gpt2_dir
from tests.models.test_moe import CONFIGS as MOE_CONFIGS
from tests.models.test_opt import KINDS as OPT_KINDS, TINY as OPT_TINY
from tests.models.test_qwen3 import qwen3_config

pytestmark = pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_packed_bf16),
                                reason="native bf16 kernels unavailable: "
                                       f"{cpu.unavailable_reason() or 'no AVX512-BF16'}")

# Ten sequences: decode steps of 10 rows take the AMX tile GEMMs where the CPU has them (8 rows and more).
PROMPTS = [[1, 5, 9, 200, 33], [1, 7], list(range(3, 40)), [1, 500, 501, 502, 7, 7, 7, 9]] + [
    [1, 40 + i, 300 + 7 * i, 12] for i in range(6)]


def _run(llm: LLM, fused: bool, prompts=PROMPTS):
    runner = llm.llm_engine.runner
    runner.model.use_fused_decode(runner.fused_decode if fused else None)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return ([o.outputs[0].token_ids for o in outs],
            [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs])


QUANT_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "quant"


QUANT_KINDS = ("gptq_sym_g32", "gptq_asym_act_g32", "gptq_8bit_asym_g32", "awq_g64_skip", "ct_w4a16_asym",
               "ct_w8a16_asym", "ct_w8a8_int8", "fp8_block", "aqlm_2x8", "aqlm_1x16")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3_rope", "mistral", "gguf", *QUANT_KINDS])
def test_fused_decode_equals_per_op_path(tiny_model_dir, kind):
    # qwen2: qkv bias; llama3_rope: one kv head, tied head; mistral: head size 32 (the generic attention loop);
    # gptq / awq / ct_w4a16: 4-bit codes with zero points per group of 32 or 64 (awq: with dense down_proj layers;
    # gptq_asym_act_g32: act-order, each layer's inputs reordered before its GEMM); gptq_8bit_asym_g32 /
    # ct_w8a16_asym: int8 codes with zero points;
    # ct_w8a8_int8: AMX-INT8 tiles where the CPU has them; fp8_block: e4m3 codes; aqlm: codebooks of 256 entries
    # (8-bit codes, the one-row table) and of 65536 (16-bit codes), merged q/k/v and gate/up with a book each.
    if kind in QUANT_KINDS:
        if not (QUANT_FIXTURES / kind).is_dir():
            pytest.skip(f"fixture {kind} missing")
        model = str(QUANT_FIXTURES / kind)
    else:
        model = bundled_gguf_path() if kind == "gguf" else tiny_model_dir(kind)
    llm = LLM(model, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False,
              skip_tokenizer_init=kind in ("llama", "qwen2", "llama3_rope", "mistral"), max_model_len=256)
    per_op = _run(llm, fused=False)
    fused = _run(llm, fused=True)
    assert llm.llm_engine.runner.fused_decode is not None, "decode steps were not fused"
    assert fused == per_op
    if kind.startswith("aqlm"):  # one sequence: the one-row kernels (2x8: the table)
        assert _run(llm, fused=True, prompts=PROMPTS[2:3]) == _run(llm, fused=False, prompts=PROMPTS[2:3])


def _static_int8_dir(tmp_path) -> str:
    """The W8A8 INT8 fixture as a static scheme: one input scale per layer (compressed-tensors' ``tensor`` strategy)
    in place of per-token scales."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / "ct_w8a8_int8_static"
    shutil.copytree(QUANT_FIXTURES / "ct_w8a8_int8", target)
    config = json.loads((target / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"].update(dynamic=False, strategy="tensor")
    (target / "config.json").write_text(json.dumps(config))
    for path in target.glob("*.safetensors"):
        tensors = load_file(path)
        scales = {name.replace("weight_scale", "input_scale"): torch.tensor([0.02 + 0.001 * i])
                  for i, name in enumerate(sorted(tensors)) if name.endswith("weight_scale")}
        save_file({**tensors, **scales}, path, metadata={"format": "pt"})
    return str(target)


def test_static_int8_fused_decode_equals_per_op_path(tmp_path):
    """W8A8 INT8 with static activation scales: the fused step quantizes each layer's input by its own scale."""
    if not (QUANT_FIXTURES / "ct_w8a8_int8").is_dir():
        pytest.skip("fixture ct_w8a8_int8 missing")
    llm = LLM(_static_int8_dir(tmp_path), dtype="bfloat16", kv_cache_memory_bytes=1 << 24,
              enable_prefix_caching=False, max_model_len=256)
    fused = llm.llm_engine.runner.fused_decode
    assert fused is not None, "decode steps were not fused"
    assert fused.layers[0].qkv.input_scale > 0
    assert _run(llm, fused=True) == _run(llm, fused=False)


def _gpt_style_dir(tiny_model_dir, kind: str) -> str:
    from transformers import OPTConfig

    if kind == "gpt2":  # GELU (tanh), LayerNorm epsilon 1e-5
        return gpt2_dir(tiny_model_dir)
    if kind == "opt":  # ReLU, biases everywhere, tied head
        return randomize_vectors(tiny_model_dir("opt_pre_norm", OPTConfig(**OPT_TINY, **OPT_KINDS["opt_pre_norm"])))
    # no biases and LayerNorms without weights: the null pointers of the native step
    config = OPTConfig(**OPT_TINY, **OPT_KINDS["opt_pre_norm"], enable_bias=False,
                       layer_norm_elementwise_affine=False)
    return tiny_model_dir("opt_plain", config)


@pytest.mark.parametrize("kind", ["opt", "opt_plain", "gpt2"])
def test_gpt_style_fused_decode_equals_per_op_path(tiny_model_dir, monkeypatch, kind):
    # The per-op LayerNorm hands small batches to torch's, which may round a last bit differently: here it runs
    # the native kernel at every size, as the fused step does.
    monkeypatch.setattr(cpu_op_impls, "LAYER_NORM_MIN_ELEMENTS", 0)
    llm = LLM(_gpt_style_dir(tiny_model_dir, kind), dtype="bfloat16", kv_cache_memory_bytes=1 << 24,
              enable_prefix_caching=False, skip_tokenizer_init=True, max_model_len=256)
    assert llm.llm_engine.runner.fused_decode is not None, "decode steps were not fused"
    assert _run(llm, fused=True) == _run(llm, fused=False)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_fused_decode_equals_per_op_path(gemma_dir, kind):
    # gemma2: sandwich norms, a sliding layer beside a global one, soft-capped attention logits; gemma3: q/k norms
    # and a rotary table per layer type. The prompts run past the window of 8.
    llm = LLM(gemma_dir(kind), dtype="bfloat16", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False,
              skip_tokenizer_init=True, max_model_len=256)
    assert llm.llm_engine.runner.fused_decode is not None, "decode steps were not fused"
    assert _run(llm, fused=True) == _run(llm, fused=False)


def test_qwen3_fused_decode_equals_per_op_path(tiny_model_dir):
    """Qwen3's per-head q/k norms in the "llama" recipe (random norm weights, so they bite), with a sliding layer of
    window 8 beside a global one."""
    config = qwen3_config(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                          layer_types=["sliding_attention", "full_attention"])
    llm = LLM(randomize_vectors(tiny_model_dir("qwen3_windows", config)), dtype="bfloat16",
              kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False, skip_tokenizer_init=True, max_model_len=256)
    assert llm.llm_engine.runner.fused_decode is not None, "decode steps were not fused"
    assert {layer.sliding_window for layer in llm.llm_engine.runner.fused_decode.stack.layers} == {8, None}
    assert _run(llm, fused=True) == _run(llm, fused=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_fused_decode_equals_per_op_path(tiny_model_dir, family):
    """Routed experts in the "llama" recipe: Mixtral (every layer sparse, renormalised float32 weights), Qwen3-MoE (a
    dense layer beside a sparse one, weights rounded to bf16) and Qwen2-MoE (the same, plus the shared expert scaled
    by the sigmoid of its gate)."""
    llm = LLM(randomize_vectors(tiny_model_dir(family, MOE_CONFIGS[family]())), dtype="bfloat16",
              kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False, skip_tokenizer_init=True, max_model_len=256)
    fused = llm.llm_engine.runner.fused_decode
    assert fused is not None, "decode steps were not fused"
    sparse = [layer.experts is not None for layer in fused.stack.layers]
    assert sparse == ([True, True] if family == "mixtral" else [False, True])
    shared = [layer.experts.shared is not None for layer in fused.stack.layers if layer.experts]
    assert shared == [family == "qwen2_moe"] * len(shared)
    assert _run(llm, fused=True) == _run(llm, fused=False)


@pytest.mark.parametrize("arch,qtype", [("qwen2moe", "Q8_0"), ("qwen3moe", "Q4_K")])
def test_gguf_moe_fused_decode_equals_per_op_path(tmp_path, arch, qtype):
    """A GGUF MoE file: block-quantized attention projections (Qwen2-MoE's with q/k/v biases) and shared-expert
    projections beside the dequantized experts, in the fused step as in the per-op path."""
    from gguf.constants import GGMLQuantizationType

    from tests.quantization.gguf_families import tiny_model, write_gguf

    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, tiny_model(arch), GGMLQuantizationType[qtype])
    llm = LLM(path, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False,
              skip_tokenizer_init=True, max_model_len=256)
    fused = llm.llm_engine.runner.fused_decode
    assert fused is not None, "decode steps were not fused"
    shared = [layer.experts.shared is not None for layer in fused.stack.layers if layer.experts]
    assert shared and all(shared) == (arch == "qwen2moe")
    assert _run(llm, fused=True) == _run(llm, fused=False)


def test_post_norm_opt_is_not_fused(tiny_model_dir):
    from transformers import OPTConfig

    config = OPTConfig(**OPT_TINY, **OPT_KINDS["opt_post_norm_projected"])
    llm = LLM(tiny_model_dir("opt_post_norm_projected", config), dtype="bfloat16", kv_cache_memory_bytes=1 << 24,
              skip_tokenizer_init=True, max_model_len=256)
    assert llm.llm_engine.runner.fused_decode is None


@pytest.mark.parametrize("kind", ["llama", "gguf"])
def test_greedy_lm_head_picks_what_the_sampler_picks(tiny_model_dir, kind):
    """All-greedy steps take the argmax inside the LM-head kernel; the tokens equal the sampler's over logits."""
    model = bundled_gguf_path() if kind == "gguf" else tiny_model_dir(kind)
    llm = LLM(model, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False,
              skip_tokenizer_init=kind != "gguf")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False)
    model_obj = llm.llm_engine.runner.model
    calls, inner = [], model_obj.compute_greedy
    model_obj.compute_greedy = lambda hidden, *allowed: (calls.append(hidden.shape[0]), inner(hidden, *allowed))[1]
    runs = []
    for greedy_head in (True, False):
        llm.llm_engine.runner.greedy_head = greedy_head
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
        assert bool(calls) == greedy_head
        calls.clear()
    assert runs[0] == runs[1]
