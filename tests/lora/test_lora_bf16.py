"""Adapters in bfloat16 on the real SmolLM2-135M-Instruct weights — the HF-format copy, and the bundled Q4_1 GGUF
(the adapter's delta in bf16 beside the quantized base) — through the platform's ``lora_shrink_expand`` (pagoda's
native kernel where the CPU has AVX512-BF16: prefill layer by layer, decode inside the fused step): a batch mixing
two adapters and the base model must be as close to transformers + peft in float32 as transformers + peft's own
bfloat16 forward is (teacher-forced log-probabilities of the tokens pagoda chose; for the GGUF, on its exact
float32 dequantization, which the HF-format copy is)."""

from __future__ import annotations

import copy

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free, bundled_gguf_path
from tests.lora.conftest import make_peft_adapter

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
MAX_TOKENS = 16


def _peft_logprobs(base: torch.nn.Module, adapter: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | prompt + tokens[:i]) from transformers (+ peft with ``adapter``) in ``base``'s dtype."""
    from peft import PeftModel

    model = copy.deepcopy(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    steps = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].log_softmax(-1)
    return steps[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["safetensors", "gguf"])
def test_bf16_adapters_as_close_to_float32_peft_as_bf16_peft(smollm2_hf_dir, tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM

    adapters = [make_peft_adapter(smollm2_hf_dir, str(tmp_path / "a"), seed=5, r=16, alpha=16, std=0.05),
                make_peft_adapter(smollm2_hf_dir, str(tmp_path / "b"), seed=6, r=8, alpha=16, std=0.05,
                                  target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))]
    model = smollm2_hf_dir if checkpoint == "safetensors" else bundled_gguf_path()
    llm = LLM(model, dtype="bfloat16", kv_cache_memory_bytes=1 << 27, enable_lora=True, max_loras=2)
    runner = llm.llm_engine.runner
    requests = [LoRARequest("a", 1, adapters[0]), LoRARequest("b", 2, adapters[1]), None]
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    rows = [(prompt, i % 3) for i, prompt in enumerate(prompts * 3)]  # every prompt with each adapter and the base
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in rows], params, use_tqdm=False,
                           lora_request=[requests[which] for _, which in rows])
    assert_all_blocks_free(llm)
    bases = {dtype: AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=dtype)
             for dtype in (torch.float32, torch.bfloat16)}
    ours, ref32, ref16 = [], [], []
    for (prompt, which), out in zip(rows, outputs):
        tokens = list(out.outputs[0].token_ids)
        adapter = adapters[which] if which < 2 else None
        ours.append(torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]))
        ref32.append(_peft_logprobs(bases[torch.float32], adapter, prompt, tokens))
        ref16.append(_peft_logprobs(bases[torch.bfloat16], adapter, prompt, tokens))
    ours, ref32, ref16 = torch.cat(ours), torch.cat(ref32), torch.cat(ref16)
    ours_err = (ours - ref32).abs().max().item()
    peft_err = (ref16 - ref32).abs().max().item()
    assert ours_err <= 2 * peft_err + 0.05, (
        f"bf16 logprob error {ours_err:.4f} vs transformers + peft bf16 {peft_err:.4f}")
    op = runner.lora.step.op
    fused = runner.fused_decode
    print(f"lora_shrink_expand={type(op).name}, fused decode with adapters: {bool(fused and fused.lora_fused)}, "
          f"max |logprob error| ours {ours_err:.4f}, transformers + peft bf16 {peft_err:.4f}")
