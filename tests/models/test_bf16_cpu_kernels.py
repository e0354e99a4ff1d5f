"""bfloat16 on the CPU runs pagoda's native kernels (packed bf16 GEMM or block-quantized GEMM for GGUF, paged
decode attention, fused norms): their results must be as close to a float32 reference as transformers' own
bfloat16 forward is. The reference for the bundled GGUF is its exact float32 dequantization (``smollm2_hf_dir``)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.platforms.cpu.kernels import cpu
from pagoda.quantization.gguf.kernels import BlockQuantKernel
from tests.conftest import assert_all_blocks_free, bundled_gguf_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colors:", "1, 2, 3, 4,"]
MAX_TOKENS = 24


def teacher_forced_logprobs(model_dir: str, dtype: torch.dtype, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | prompt + tokens[:i]) from transformers in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    steps = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].log_softmax(-1)
    return steps[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.slow
@pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_packed_bf16),
                    reason=f"native bf16 kernels unavailable: {cpu.unavailable_reason() or 'no AVX512-BF16'}")
@pytest.mark.parametrize("checkpoint", ["safetensors", "gguf"])
def test_bf16_kernels_match_float32_reference_as_closely_as_transformers_bf16(smollm2_hf_dir, checkpoint):
    model = smollm2_hf_dir if checkpoint == "safetensors" else bundled_gguf_path()
    llm = LLM(model, dtype="bfloat16", kv_cache_memory_bytes=1 << 27)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    layer = llm.llm_engine.runner.model.model.layers[0].mlp.down_proj
    if checkpoint == "safetensors":
        assert not layer.dense_op.is_reference, "the bf16 linear did not run on a native kernel"
    else:
        assert isinstance(layer.gguf_kernels[0], BlockQuantKernel), type(layer.gguf_kernels[0])
    assert_all_blocks_free(llm)
    ours, ref32, ref16 = [], [], []
    for prompt, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        ours.append(torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]))
        ref32.append(teacher_forced_logprobs(smollm2_hf_dir, torch.float32, prompt, tokens))
        ref16.append(teacher_forced_logprobs(smollm2_hf_dir, torch.bfloat16, prompt, tokens))
    ours, ref32, ref16 = torch.cat(ours), torch.cat(ref32), torch.cat(ref16)
    ours_err = (ours - ref32).abs().max().item()
    hf_err = (ref16 - ref32).abs().max().item()
    assert ours_err <= 2 * hf_err + 0.05, f"bf16 logprob error {ours_err:.4f} vs transformers bf16 {hf_err:.4f}"
