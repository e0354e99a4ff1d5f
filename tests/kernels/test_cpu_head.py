"""The greedy LM head's int8 screen (cpu_head): the same argmax as the full bf16 pass, bit for bit, on any input."""

from __future__ import annotations

import pytest
import torch

from pagoda.platforms.cpu.kernels import cpu, cpu_head, cpu_ops
from tests.ops.op_cases import mask_words

pytestmark = pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().has_vnni_int8),
                                reason="the native library has no AVX512-VNNI int8 path on this CPU")


def _screened(weight: torch.Tensor):
    packed = cpu_ops.pack_weight(weight)
    screen = cpu_head.head_screen(weight)
    assert screen is not None
    return packed, screen


def _full(x, packed, allowed=None):
    """The full pass's answer, checked against the argmax of the kernel's own logits where no mask applies."""
    out = cpu_head.linear_argmax(x, packed, allowed=allowed)
    if allowed is None:
        assert torch.equal(out, cpu_ops.packed_linear(x, packed, float_output=True).argmax(-1))
    return out


def _mask(rows: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = torch.rand(rows, n, generator=g) < 0.4
    return allowed, mask_words(allowed)


@pytest.mark.parametrize("n, k", [(5000, 96), (1000, 70), (49152, 576), (257, 640)])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_screened_argmax_equals_the_full_pass(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    weight = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    packed, screen = _screened(weight)
    for scale, outlier in ((1.0, 200.0), (30.0, 200.0), (1.0, 1.0)):
        x = (torch.randn(rows, k, generator=g) * scale).bfloat16()
        x[:, 0] *= outlier  # an outlier channel, as final hidden states have (set aside in float), or none
        assert torch.equal(cpu_head.screened_argmax(x, packed, screen), _full(x, packed))
        allowed, words = _mask(rows, n, g)
        picked = cpu_head.screened_argmax(x, packed, screen, words)
        assert torch.equal(picked, _full(x, packed, words))
        assert allowed.gather(1, picked[:, None]).all()


def test_near_ties_are_decided_by_the_exact_products():
    """Columns that differ from each other by less than the int8 codes resolve: the screen alone can't order them,
    the exact products must."""
    g = torch.Generator().manual_seed(7)
    n, k = 4096, 256
    base = torch.randn(1, k, generator=g)
    weight = (base + torch.randn(n, k, generator=g) * 2e-3).bfloat16()  # within a few int8 steps of each other
    packed, screen = _screened(weight)
    for trial in range(20):
        x = (base + torch.randn(1, k, generator=g) * 0.3).bfloat16().repeat(3, 1)
        x[1:] += (torch.randn(2, k, generator=g) * 0.05).bfloat16()
        assert torch.equal(cpu_head.screened_argmax(x, packed, screen), _full(x, packed)), f"trial {trial}"


def test_the_bound_holds_where_the_int8_error_lines_up_with_the_input():
    """The worst case of the screen's bound: the input points along column A's int8 rounding error, so A's screened
    product falls short of its exact one by nearly the whole bound, and column B (exact in int8) lies between the
    two. A is the argmax; a screen that trusted less than its full bound would drop it."""
    g = torch.Generator().manual_seed(3)
    n, k, big = 512, 64, 9
    weight = torch.randn(n, k, generator=g) * 0.01  # other columns, far below
    codes_a = torch.randint(-120, 121, (k,), generator=g).double()
    codes_a[:big] = 127  # the scale is then exactly 1/128, and A leads the other columns by far
    frac = torch.rand(k, generator=g, dtype=torch.float64) - 0.5
    frac[:big] = 0  # exact on the channels the screen takes in float
    a = ((codes_a + frac) / 128).bfloat16().double()
    codes_a = torch.round(a * 128)
    error = a - codes_a / 128
    # x along the error, on an int8 grid whose full-scale value survives setting the eight largest channels aside
    # (nine of them at full scale, all error-free): its int8 form is then exact and only the weight's error is left.
    steps = torch.round(error / error.abs().max() * 120)
    steps[:big] = 127
    x = steps / 16
    gap = float(error @ x)  # A's exact product minus its screened one
    codes_b = codes_a.clone()
    added = 0.0
    for i in error.abs().argsort(descending=True).tolist():  # nudge B's codes along x up to ~97 % of the gap
        if abs(codes_b[i]) < 127 and added + abs(float(x[i])) / 128 < 0.97 * gap:
            codes_b[i] += torch.sign(error[i])
            added += abs(float(x[i])) / 128
    b = codes_b / 128
    s_a, s_b, screened_a = float(a @ x), float(b @ x), float(codes_a / 128 @ x)
    assert screened_a + 0.9 * gap < s_b < s_a, "the construction must put B between A's screened and exact products"
    weight[100], weight[300] = a.float(), b.float()
    packed, screen = _screened(weight.bfloat16())
    x = x.bfloat16()[None]
    assert _full(x, packed).item() == 100
    assert cpu_head.screened_argmax(x, packed, screen).item() == 100


def test_ties_non_finite_inputs_and_crowded_rows_take_the_full_pass_rules():
    n, k = 16384, 64
    same = torch.full((n, k), 0.25).bfloat16()  # every column ties: too many candidates, the full pass decides
    packed, screen = _screened(same)
    x = torch.ones(2, k).bfloat16()
    assert cpu_head.screened_argmax(x, packed, screen).tolist() == [0, 0]  # the first of equal maxima
    allowed = torch.ones(2, n // 32, dtype=torch.int32).neg()  # all bits set
    allowed[:, 0] = -2  # column 0 forbidden
    assert cpu_head.screened_argmax(x, packed, screen, allowed).tolist() == [1, 1]
    w = torch.randn(300, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    w[[7, 250]] = w[120].clone()  # exact ties among a few columns
    packed, screen = _screened(w)
    x = w[120:121].float().repeat(4, 1).bfloat16()
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = 0  # all products zero: the first column
    picked = cpu_head.screened_argmax(x, packed, screen)
    assert torch.equal(picked, _full(x, packed))
    assert picked[0] == 7 and picked[3] == 0


def test_no_screen_for_non_finite_heads():
    w = torch.randn(64, 32).bfloat16()
    w[5, 3] = float("inf")
    assert cpu_head.head_screen(w) is None


def test_decode_batches_with_crowded_rows_and_shared_candidate_tiles():
    """A decode batch (64 rows, as W1's steps): rows whose candidates crowd past the screen's cap go to the full
    pass together, and the others' candidates, many per row and sharing column tiles, are multiplied a tile at a
    time for all of their rows. Every row must still be the full pass's answer, at every input scale (from rows with
    hundreds of candidates to rows with one), with and without a token mask per row."""
    g = torch.Generator().manual_seed(11)
    n, k = 16384, 128
    weight = torch.randn(n, k, generator=g) * 0.05
    weight[:12000] = weight[5000].clone()  # 12000 equal columns: rows along them crowd every thread's share
    near = torch.randn(k, generator=g) * 0.05
    weight[12000:12600] = near + torch.randn(600, k, generator=g) * 1e-4  # within an int8 step: many candidates
    packed, screen = _screened(weight.bfloat16())
    for scale in (0.05, 0.2, 1.0, 5.0):
        x = torch.randn(64, k, generator=g) * scale
        x[:4] = weight[5000] * 40  # crowded rows: the first of the equal columns wins
        x[10:14] = weight[14000] * 40 + x[10:14]  # rows whose best column lies in the other thread's share
        x[20:30] = near * 40 + x[20:30]  # rows sharing the near-equal columns' tiles
        x = x.bfloat16()
        picked = cpu_head.screened_argmax(x, packed, screen)
        assert torch.equal(picked, _full(x, packed)), f"scale {scale}"
        assert picked[:4].tolist() == [0, 0, 0, 0]
        # A dense mask per row keeps the crowded rows past the cap: each is its own first allowed tie.
        allowed = torch.rand(64, n, generator=g) < 0.9
        for r in range(4):  # crowded row r: its first allowed tie is column r
            allowed[r, :r] = False
            allowed[r, r] = True
        words = mask_words(allowed)
        picked = cpu_head.screened_argmax(x, packed, screen, words)
        assert torch.equal(picked, _full(x, packed, words)), f"scale {scale}, masked"
        assert allowed.gather(1, picked[:, None]).all()
        assert picked[:4].tolist() == [0, 1, 2, 3]
