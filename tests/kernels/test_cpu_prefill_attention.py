"""The native prefill attention and KV-cache write against float64 maths and torch's own bf16 SDPA; the
kernels' sharing of tasks between threads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pagoda.platforms.cpu.kernels import cpu, cpu_head, cpu_ops

pytestmark = pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_packed_bf16),
                                reason="this CPU has no AVX512-BF16: the native prefill attention is not built")

BLOCK = 16


def paged_batch(specs, heads, kv_heads, d, seed, num_blocks=160):
    """A paged cache holding sequences of ``(cached, new)`` tokens in shuffled blocks, and the query rows of
    their new tokens as a strided view of a wider (fused QKV-like) tensor."""
    g = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(num_blocks, BLOCK, kv_heads, d, generator=g).bfloat16()
    value_cache = torch.randn(num_blocks, BLOCK, kv_heads, d, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g).int()
    table = torch.zeros(len(specs), num_blocks, dtype=torch.int32)
    starts, lens, used = [0], [], 0
    for i, (cached, new) in enumerate(specs):
        blocks = -(-(cached + new) // BLOCK)
        table[i, :blocks] = order[used:used + blocks]
        used += blocks
        starts.append(starts[-1] + new)
        lens.append(cached + new)
    wide = torch.randn(starts[-1], heads * d + 3 * d, generator=g).bfloat16()
    query = wide[:, :heads * d].view(-1, heads, d)
    return query, key_cache, value_cache, table, torch.tensor(starts, dtype=torch.int32), torch.tensor(
        lens, dtype=torch.int32)


def reference(query, key_cache, value_cache, table, starts, lens, window, dtype=torch.float64):
    """Per sequence: gather the context, mask causally (and by the window), softmax attention in ``dtype``."""
    heads, kv_heads = query.shape[1], key_cache.shape[2]
    out = []
    for i in range(len(lens)):
        s, e, length = int(starts[i]), int(starts[i + 1]), int(lens[i])
        blocks = table[i, :-(-length // BLOCK)].long()
        k = key_cache[blocks].flatten(0, 1)[:length].transpose(0, 1).to(dtype)
        v = value_cache[blocks].flatten(0, 1)[:length].transpose(0, 1).to(dtype)
        q = query[s:e].transpose(0, 1).to(dtype)
        q_pos = torch.arange(length - (e - s), length)[:, None]
        k_pos = torch.arange(length)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                           scale=1 / math.sqrt(q.shape[-1]), enable_gqa=heads != kv_heads)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


# (tokens already cached, new tokens) per sequence: fresh prompts, prefix-cache hits, chunks of long prompts
# (more keys than one 256-key chunk of the kernel), single-token chunks.
SPECS = [(0, 128), (0, 1), (5, 30), (300, 7), (17, 290), (0, 97)]


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (8, 1, 64)])
@pytest.mark.parametrize("window", [None, 37])
def test_prefill_attention_matches_float64_as_closely_as_torch_bf16(heads, kv_heads, d, window):
    query, key_cache, value_cache, table, starts, lens = paged_batch(SPECS, heads, kv_heads, d, seed=heads + d)
    out = cpu_ops.prefill_attention(query, key_cache, value_cache, table, starts, lens, 1 / math.sqrt(d), window)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == query.shape
    exact = reference(query, key_cache, value_cache, table, starts, lens, window)
    ours = (out.double() - exact).abs()
    torch_bf16 = (reference(query, key_cache, value_cache, table, starts, lens, window, torch.bfloat16).double()
                  - exact).abs()
    # One bf16 rounding of the output is 2^-9 relative; the exponentials are rounded to bf16 like torch's.
    assert ours.max() <= max(2 * torch_bf16.max().item(), 2 ** -7 * exact.abs().max().item())
    assert ours.mean() <= 1.5 * torch_bf16.mean() + 1e-6


def test_prefill_attention_declines_what_it_does_not_cover():
    query, key_cache, value_cache, table, starts, lens = paged_batch([(0, 8)], 4, 2, 40, seed=1)
    args = (table, starts, lens, 0.1, None)
    assert cpu_ops.prefill_attention(query, key_cache, value_cache, *args) is None  # head size 40
    query, key_cache, value_cache, table, starts, lens = paged_batch([(0, 8)], 4, 2, 64, seed=1)
    assert cpu_ops.prefill_attention(query.float(), key_cache.float(), value_cache.float(), table, starts, lens,
                                     0.1, None) is None  # float32 keeps SDPA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_index_copy(dtype):
    g = torch.Generator().manual_seed(0)
    key_cache = torch.zeros(2, 12, BLOCK, 3, 64, dtype=dtype)
    expected = key_cache.clone()
    fused = torch.randn(100, 9 * 64 + 6 * 64, generator=g).to(dtype)  # q | k | v rows, as the QKV projection
    key = fused[:, 9 * 64:12 * 64].view(-1, 3, 64)
    value = fused[:, 12 * 64:].view(-1, 3, 64)
    slots = torch.randperm(12 * BLOCK, generator=g)[:100]
    assert cpu_ops.write_kv(key_cache[0], key_cache[1], key, value, slots)
    expected[0].view(-1, 3, 64).index_copy_(0, slots, key)
    expected[1].view(-1, 3, 64).index_copy_(0, slots, value)
    assert torch.equal(key_cache, expected)


def test_results_do_not_depend_on_how_tasks_are_shared_out():
    """Each thread runs its own share of a kernel's tasks, then takes what is left of the others' shares. With more
    threads than cores they are preempted mid-share and the others finish for them: every task must still run
    exactly once and compute the same numbers as on one thread."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(67, 576, generator=g).bfloat16()
    weight = cpu_ops.pack_weight(torch.randn(1000, 576, generator=g).bfloat16())
    norm_weight = torch.randn(576, generator=g).bfloat16()

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return [torch.cat([cpu_ops.packed_linear(x, weight) for _ in range(3)]),
                    cpu_head.linear_argmax(x, weight), *cpu_ops.rms_norm(x, norm_weight, 1e-5, x),
                    cpu_ops.gated_activation(x, "silu")]
        finally:
            torch.set_num_threads(before)

    serial = run(1)
    for _ in range(3):
        for a, b in zip(serial, run(7)):
            assert torch.equal(a, b)
