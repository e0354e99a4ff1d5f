"""Op-matrix cases of the mixture-of-experts ops: ``fused_moe`` (the mixture, one expert's products alone, and the
mixture with LoRA adapters on the experts, through :class:`pagoda.lora.experts.ExpertsLoRA` as a model's block runs
it) and ``moe_topk``, against the reference and float64 maths."""

from __future__ import annotations

import torch

from pagoda.lora.experts import ExpertsLoRA
from tests.ops.op_cases import _close, _gen


def _moe_float64(x, w13, w2, topk_weights, topk_ids):
    """The mixture in float64, token by token (the op's definition)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for weight, expert in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            gate, up = (x[t].double() @ w13[expert].double().T).chunk(2)
            out[t] += weight * (torch.nn.functional.silu(gate) * up) @ w2[expert].double().T
    return out


def fused_moe(impl, ref, dtype):
    # (experts, top-k, hidden, intermediate): Mixtral-like top-2, wider top-k, an intermediate size that is not a
    # multiple of 16 (padded tiles), one expert per token.
    for experts, k, hidden, inter in ((8, 2, 64, 32), (16, 4, 128, 96), (6, 2, 96, 40), (4, 1, 64, 64)):
        g = _gen(experts, k, hidden, inter)
        w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
        w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
        handle, ref_handle = impl.prepare(w13.clone(), w2.clone()), ref.prepare(w13, w2)
        for expert, tokens in ((0, 1), (experts - 1, 19)):  # one expert's products alone (what expert LoRA calls)
            x = torch.randn(tokens, hidden, generator=g).to(dtype)
            h = impl.expert_matmul(handle, expert, "gate_up", x)
            _close(h, (x.double() @ w13[expert].double().T).to(dtype), dtype, f"expert_matmul gate_up E{expert}")
            act = torch.randn(tokens, inter, generator=g).to(dtype)
            _close(impl.expert_matmul(handle, expert, "down", act), (act.double() @ w2[expert].double().T).to(dtype),
                   dtype, f"expert_matmul down E{expert}")
        # Token counts from decode (1 row per expert) through prefill (AMX blocks of 64 rows and more).
        for tokens in (1, 3, 16, 64, 130):
            x = torch.randn(tokens, hidden, generator=g).to(dtype)
            topk_ids = torch.rand(tokens, experts, generator=g).topk(k, dim=-1).indices
            topk_weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
            what = f"fused_moe E{experts} top{k} {tokens}x{hidden} inter {inter}"
            out = impl.apply(handle, x, topk_weights, topk_ids)
            expected = ref.apply(ref_handle, x, topk_weights, topk_ids)
            scale = expected.abs().max().item()
            _close(out, expected, dtype, what, scale)
            exact = _moe_float64(x, w13, w2, topk_weights, topk_ids)  # the reference computes what the op says
            _close(expected, exact.to(dtype), dtype, what + " reference vs float64", scale)


def moe_topk(impl, ref, dtype):
    # (tokens, experts, top-k): a Mixtral router at decode and prefill sizes, Qwen-MoE's wide one, top-1 and all.
    for tokens, experts, k in ((1, 8, 2), (37, 8, 2), (5, 64, 8), (9, 6, 1), (4, 4, 4)):
        g = _gen(tokens, experts, k)
        logits = (torch.randn(tokens, experts, generator=g) * 3).to(dtype)
        for renormalize in (False, True):
            what = f"moe_topk {tokens}x{experts} top{k} renormalize={renormalize}"
            weights, ids = impl(logits, k, renormalize)
            ref_weights, ref_ids = ref(logits, k, renormalize)
            assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids), what
            # Float32 weights either way: a softmax's exp may differ in its last bits.
            torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6, msg=what)
            # The reference computes what the op says: float64 softmax, its k largest, renormalised.
            probs = torch.softmax(logits.double(), -1)
            chosen = probs.gather(1, ref_ids)
            assert torch.equal(chosen.argsort(dim=1, descending=True, stable=True),
                               torch.arange(k).expand(tokens, k)), what + ": not in descending order"
            assert (chosen.min(dim=1).values[:, None] >= probs.masked_fill(
                torch.zeros_like(probs, dtype=torch.bool).scatter(1, ref_ids, True), -1)).all(), what + ": not top-k"
            expected = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
            torch.testing.assert_close(ref_weights.double(), expected, rtol=1e-5, atol=1e-6, msg=what)


def _experts_lora(experts: int, hidden: int, inter: int, g: torch.Generator, dtype: torch.dtype) -> ExpertsLoRA:
    """Three slots of rank up to 4 for a model of ``dtype``: slot 0 adapts gate-up and down at rank 4, slot 1 only
    down at rank 2; slot 2 holds numbers but its adapter does not adapt this block (no delta may come from it)."""
    lora = ExpertsLoRA(None, experts, hidden, inter, num_slots=3, max_rank=4, device=torch.device("cpu"), dtype=dtype)
    for t in (lora.a13, lora.bt13, lora.a2, lora.bt2):
        t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    lora.a13[1] = 0
    lora.bt13[1] = 0
    lora.a2[1, :, 2:] = 0
    lora.adapted = [True, True, False]
    lora.adapted_mask[:3] = torch.tensor([1, 1, 0], dtype=torch.uint8)
    return lora


def _moe_lora_float64(x, w13, w2, topk_weights, topk_ids, lora, token_slots):
    """The mixture with each adapted token's deltas in float64, token by token."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        on = s >= 0 and lora.adapted[s]
        for weight, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            xt = x[t].double()
            h = xt @ w13[e].double().T
            if on:
                h += (xt @ lora.a13[s, e].double().T) @ lora.bt13[s, e].double()
            gate, up = h.chunk(2)
            act = torch.nn.functional.silu(gate) * up
            y = act @ w2[e].double().T
            if on:
                y += (act @ lora.a2[s, e].double().T) @ lora.bt2[s, e].double()
            out[t] += weight * y
    return out


def fused_moe_lora(impl, ref, dtype):
    """The mixture with adapters on the experts: the implementation's own form (``apply_lora``) where it has one,
    else expert by expert on its ``expert_matmul``, as :class:`ExpertsLoRA` runs a block."""
    for experts, k, hidden, inter in ((8, 2, 64, 32), (6, 2, 96, 40)):
        g = _gen(experts, k, hidden, inter, 7)
        w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
        w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
        handle = impl.prepare(w13.clone(), w2.clone())
        lora = _experts_lora(experts, hidden, inter, g, dtype)
        for tokens in (1, 5, 64):  # decode batches: one token, a few, W1's 64 (several rows per expert and slot)
            x = torch.randn(tokens, hidden, generator=g).to(dtype)
            topk_ids = torch.rand(tokens, experts, generator=g).topk(k, dim=-1).indices
            topk_weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
            token_slots = torch.randint(-1, 3, (tokens,), generator=g)
            token_slots[0] = 0  # a gate-up and down adapter in every step
            what = f"fused_moe with expert LoRA E{experts} top{k} {tokens}x{hidden} inter {inter}"
            exact = _moe_lora_float64(x, w13, w2, topk_weights, topk_ids, lora, token_slots)
            # A block passes the slots whose adapter adapts it (ExpertsLoRA.rows: -1 for slot 2's tokens).
            mine = torch.where(token_slots == 2, -1, token_slots)
            out = lora.forward(impl, handle, x, topk_weights, topk_ids, "silu", mine)
            _close(out, exact.to(dtype), dtype, what, exact.abs().max().item())
            own = impl.apply_lora(handle, lora, x, topk_weights, topk_ids, "silu", token_slots)
            if own is not None:  # an implementation's own form leaves a slot alone where its adapter does
                _close(own, exact.to(dtype), dtype, what + " (apply_lora)", exact.abs().max().item())
            plain = token_slots < 0
            if plain.any():  # rows without an adapter are the op's own mixture
                base = impl.apply(handle, x[plain], topk_weights[plain], topk_ids[plain])
                _close(out[plain], base, dtype, what + " (rows without an adapter)", base.abs().max().item())


CASES = {"fused_moe": [fused_moe, fused_moe_lora], "moe_topk": [moe_topk]}
