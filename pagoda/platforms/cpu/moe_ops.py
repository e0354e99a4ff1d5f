"""The CPU platform's mixture-of-experts ops: ``fused_moe`` (pagoda's native kernel on packed expert weights) and
``moe_topk`` (the router's softmax and top-k in one native call instead of three torch ones).

Registered because it measured faster than the torch reference on an AMX Xeon at decode shapes (T = 1-64,
``docs/benchmarks.md``, the fused-MoE table): at decode the reference multiplies one expert after another, each a
small bf16 matmul whose weights stream from memory on one call's threads; the native kernel reads all the chosen
experts' weights in one parallel loop. At prefill sizes (2048 tokens) oneDNN's matmuls under the reference are
still 1.5x faster than the AMX tile loop here; the packed copy replaces the stacked weights, so there is no
oneDNN copy to hand those to.
"""

from __future__ import annotations

import torch

from pagoda.ops.reference_moe import check_moe_activation
from pagoda.platforms.cpu.kernels import cpu_moe, cpu_ops
from pagoda.platforms.cpu.ops import AmxTiles, _Native, _NativeBf16Gemm


class PackedFusedMoE(_NativeBf16Gemm):
    """bf16 experts packed for the AVX512-BF16 GEMM; a copy, so the stacked parameters are dropped."""

    op, name = "fused_moe", "cpu_avx512_bf16"
    keeps_weight = False
    uses_amx = False

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> cpu_moe.PackedExperts:
        return cpu_moe.pack_experts(w13, w2)

    def apply(self, handle, x, topk_weights, topk_ids, activation="silu"):
        check_moe_activation(activation)
        return cpu_moe.fused_moe(x, topk_weights, topk_ids, handle, amx=self.uses_amx)

    def apply_lora(self, handle, lora, x, topk_weights, topk_ids, activation, token_slots):
        # The deltas inside the native mixture (cpu_moe_lora.h): one call for every token, as without adapters.
        check_moe_activation(activation)
        return cpu_moe.fused_moe(x, topk_weights, topk_ids, handle, amx=self.uses_amx,
                                 lora=cpu_moe.MoELoRASlots(lora), token_slots=token_slots)

    def expert_matmul(self, handle, expert, part, x):
        return cpu_ops.packed_linear(x, handle.expert(expert, part), amx=self.uses_amx)

    def nbytes(self, handle) -> int:
        return handle.nbytes()


class AmxFusedMoE(AmxTiles, PackedFusedMoE):
    """The same packed experts, with experts that received 8 rows or more multiplied on AMX tiles."""


class NativeMoeTopK(_Native):
    """The router's choice in one call (float32 softmax, top-k, renormalisation), the function the fused decode step
    calls too, so the two paths route alike."""

    op, name, dtypes = "moe_topk", "cpu_native", (torch.bfloat16,)

    def __call__(self, logits, top_k, renormalize):
        return cpu_moe.moe_topk(logits, top_k, renormalize)


CPU_MOE_OP_IMPLS = [PackedFusedMoE, AmxFusedMoE, NativeMoeTopK]
