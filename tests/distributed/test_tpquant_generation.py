"""Quantized checkpoints generated with tensor_parallel_size 2 give the single-process engine's greedy tokens.

The tool-made tiny Llama checkpoints of ``tests/fixtures/quant`` (AWQ, act-order GPTQ, GPTQ with a quantized
8-bit LM head, compressed-tensors W4A16 with zero points, AQLM) run on two spawned ranks (``tests/distributed/spmd``)
and in one process, in float32: the same greedy tokens, and log-probabilities within the rounding of the
row-parallel partial sums.
"""

from __future__ import annotations

from pathlib import Path

import pytest

spmd = pytest.importorskip("tests.distributed.spmd",
                           reason="needs the tensor-parallel spawn helper (tests/distributed/spmd.py)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "quant"
CHECKPOINTS = ["awq_g32", "gptq_asym_act_g32", "gptq_lm_head", "ct_w4a16_asym", "aqlm_2x8"]
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-3


def _jobs() -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from pagoda import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False, logprobs=1)
    jobs = []
    for name in CHECKPOINTS:
        path = FIXTURES / name
        prompts = load_file(str(path / "reference" / "outputs.safetensors"))["input_ids"]
        runs = [([{"prompt_token_ids": ids.tolist()} for ids in prompts.to(torch.int64)], params)]
        jobs.append({"model": str(path), "engine": {"skip_tokenizer_init": True, "max_model_len": 64}, "runs": runs})
    return jobs


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"quantized fixtures not found at {FIXTURES}")
def test_quantized_checkpoints_split_over_two_ranks():
    jobs = _jobs()
    single = spmd.generate_jobs(jobs, {})
    split = spmd.run_engines(jobs, tensor_parallel_size=2)
    for name, one, two in zip(CHECKPOINTS, single, split):
        assert two["tensor_parallel_size"] == 2
        for want, got in zip(one["runs"][0], two["runs"][0]):
            assert got["token_ids"] == want["token_ids"], f"{name}: {got['token_ids']} vs {want['token_ids']}"
            worst = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
            assert worst <= LOGPROB_ATOL, f"{name}: logprobs differ by {worst:.2e}"
