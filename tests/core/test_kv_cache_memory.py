"""The KV cache's first use of a block. Where the platform hands out memory that reads as zeros (the CPU:
anonymous pages, zero-filled by the kernel on first touch) no block is zeroed by the engine; where it doesn't, the
engine zeroes each block the first time it is used, so whatever the memory held before (NaN bit patterns
included) never reaches attention through the masked positions of a partly filled block."""

from __future__ import annotations

import math

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.platforms.cpu import CpuPlatform

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [30, 31, 32]]
PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)


def test_cpu_zeroed_empty_reads_as_zeros_and_is_writable():
    shape = (2, 64, 16, 3, 64)
    cache = CpuPlatform.zeroed_empty(shape, torch.bfloat16)
    assert cache.shape == shape and cache.dtype == torch.bfloat16 and cache.is_contiguous()
    assert not cache.any()
    cache[1, 5, 3] = 1.5
    assert cache.sum().item() == 1.5 * 3 * 64


def _generate(llm: LLM):
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_are_zeroed_on_first_use_where_the_platform_has_no_zeroed_memory(tiny_model_dir, monkeypatch, dtype):
    kwargs = dict(dtype=dtype, skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=32)
    llm = LLM(tiny_model_dir("llama"), **kwargs)
    assert not llm.llm_engine.runner._zero_fresh_blocks
    expected = _generate(llm)
    del llm
    monkeypatch.setattr(CpuPlatform, "zeroed_empty", classmethod(lambda cls, shape, dtype: None))
    llm = LLM(tiny_model_dir("llama"), **kwargs)
    runner = llm.llm_engine.runner
    assert runner._zero_fresh_blocks
    for cache in runner.kv_caches:  # garbage in every block but the padding block 0
        cache[:, 1:] = float("nan")
    tokens, logprobs = _generate(llm)
    assert tokens == expected[0]
    assert all(math.isfinite(lp) for row in logprobs for lp in row)
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected[1]))
    # Every block handed out was zeroed before its first write: no NaN is left in any of them (their unwritten
    # tails included); the blocks never handed out still hold the garbage.
    used = [i for i, fresh in enumerate(llm.llm_engine.scheduler.kv.pool._never_used) if not fresh]
    unused = [i for i in range(1, len(runner.kv_caches[0][0])) if i not in used]
    assert len(used) >= 3 and unused
    for cache in runner.kv_caches:
        assert not cache[:, used].isnan().any()
        assert cache[:, unused].isnan().all()
