"""The K-quants (and Q5_0/Q5_1) as int8 codes for the linear_block_quant op: the values every form holds are the
file's values bit for bit (``gguf.quants.dequantize``), on the reference and on the native CPU kernel, in less
memory than bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from pagoda.ops import reference_ops, select_ops
from pagoda.platforms import resolve_platform
from pagoda.platforms.cpu.kernels import cpu
from pagoda.quantization.gguf.dequant import int8_affine, int8_scaled
from pagoda.quantization.gguf.kernels import BlockQuantKernel, make_kernel

from .conftest import random_blocks

AFFINE = [T.Q2_K, T.Q5_K, T.Q6_K, T.Q5_1]
SCALED = [T.Q3_K, T.Q5_0]
HAS_NATIVE = bool(cpu.kernels() and cpu.kernels().has_packed_bf16)
ROWS, COLS = 40, 512  # rows not a multiple of the kernel's 16-row tiles


def _file_values(qtype) -> tuple[torch.Tensor, torch.Tensor]:
    raw = random_blocks(qtype, ROWS, COLS, seed=int(qtype))
    return torch.from_numpy(raw), torch.from_numpy(quants.dequantize(raw, qtype).reshape(ROWS, COLS))


@pytest.mark.parametrize("qtype", AFFINE + SCALED, ids=lambda t: t.name)
def test_int8_forms_hold_the_files_values(qtype):
    raw, expected = _file_values(qtype)
    ref = reference_ops().linear_block_quant
    if qtype in AFFINE:
        codes, scale, offset, group = int8_affine(raw, qtype)
        handle = ref.prepare_affine(codes, scale, offset, group)
    else:
        codes, scale = int8_scaled(raw, qtype)
        handle = ref.prepare(codes, scale, None, 8)  # float16 scales: Q8_0's own form
    assert codes.dtype == torch.int8
    assert torch.equal(ref.weight(handle), expected)


def test_q3_k_codes_reach_the_int8_limit():
    """Q3_K's sc·q reaches 128 (sc = −32, q = −4): stored negated, so every code fits int8."""
    raw = np.zeros((1, 110), dtype=np.uint8)  # hmask 0 (q = ql − 4), ql 0, scales 0 (sc = −32)
    raw[0, 108:110] = np.array([0.5], dtype=np.float16).view(np.uint8)
    codes, scale = int8_scaled(torch.from_numpy(raw.reshape(1, -1)), T.Q3_K)
    assert codes.min().item() == -128
    expected = quants.dequantize(raw, T.Q3_K).reshape(1, 256)
    np.testing.assert_array_equal((codes.float() * scale.repeat_interleave(32, 1)).numpy(), expected)


@pytest.mark.skipif(not HAS_NATIVE, reason="native bf16 kernels unavailable")
@pytest.mark.parametrize("qtype", AFFINE + SCALED + [T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_native_kernel_holds_the_files_values_in_less_than_bf16(qtype):
    raw, expected = _file_values(qtype)
    op = select_ops(resolve_platform("cpu"), torch.bfloat16).linear_block_quant
    kernel = make_kernel(raw, qtype, (ROWS, COLS), torch.bfloat16, op)
    assert isinstance(kernel, BlockQuantKernel)
    assert kernel.nbytes() / (-(-ROWS // 16) * 16 * COLS) <= 1.51  # per weight of whole 16-row tiles; bf16: 2
    rows = kernel.rows(torch.arange(ROWS), torch.float32)
    assert torch.equal(rows, expected)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = x.double() @ expected.double().T
    bound = x.double().abs() @ expected.double().abs().T
    assert ((kernel.matmul_float(x).double() - exact).abs() / bound).max() < 1e-5
    assert ((kernel.matmul(x).double() - exact).abs() / bound).max() < 1e-2


# Ten sequences: decode steps of 10 rows take the AMX tile GEMMs where the CPU has them (8 rows and more).
DECODE_PROMPTS = [[1, 5, 9, 200, 33], [1, 7], list(range(3, 40))] + [[1, 40 + i, 300 + 7 * i, 12] for i in range(7)]
# every int8 kind in one model: per-16 affine (Q2_K, the Q6_K head), per-32 affine (Q5_K), float16-scaled (Q3_K)
# (a merged layer's shards share a type, as fusing needs one kernel per layer)
MIXED = {"attn_output": T.Q3_K, "attn": T.Q2_K, "ffn_down": T.Q6_K, "ffn": T.Q5_K, "output.": T.Q6_K, "": T.Q2_K}


@pytest.mark.skipif(not HAS_NATIVE, reason="native bf16 kernels unavailable")
def test_fused_decode_and_greedy_head_equal_the_per_op_path(tmp_path):
    from pagoda import LLM, SamplingParams
    from tests.conftest import assert_all_blocks_free

    from .gguf_families import tiny_model, write_gguf

    path = write_gguf(str(tmp_path / "qwen2-kquants.gguf"), "qwen2", tiny_model("qwen2"), MIXED)
    llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24,
              enable_prefix_caching=False, max_model_len=128)
    runner = llm.llm_engine.runner
    assert runner.fused_decode is not None, "decode steps were not fused"
    runs = []
    for fused, greedy_head in ((False, False), (True, False), (True, True)):
        runner.model.use_fused_decode(runner.fused_decode if fused else None)
        runner.greedy_head = greedy_head
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, detokenize=False,
                                logprobs=None if greedy_head else 2)
        outs = llm.generate([{"prompt_token_ids": p} for p in DECODE_PROMPTS], params, use_tqdm=False)
        assert_all_blocks_free(llm)
        runs.append(([o.outputs[0].token_ids for o in outs],
                     None if greedy_head else [[{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs]
                                               for o in outs]))
    assert runs[1] == runs[0]  # same kernels, same order: bit-identical logprobs
    assert runs[2][0] == runs[0][0]  # the argmax inside the LM-head kernel picks the sampler's tokens
