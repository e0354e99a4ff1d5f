"""The op interface: named kernels with one implementation per kind of hardware.

An **op** is a named computation models and attention backends call (``rms_norm``, ``linear_dense``,
``paged_decode_attention``, …; :data:`OPS` lists them with their contracts). An **implementation** is an
:class:`OpImpl` subclass registered through the ``pagoda_register_ops`` hook. It declares

* ``op`` — which op it implements, and ``name`` — how users force it (``--op-impl rms_norm=NAME``);
* ``platforms`` — the platform names it runs on (``None``: any platform torch runs on);
* ``requires`` — capabilities the resolved platform must report (:meth:`Platform.capabilities`: CPU flags such
  as ``amx_bf16`` or ``avx512_bf16``, ``sm_80`` on CUDA, …) and ``package:NAME`` for importable packages;
* ``dtypes`` — the model dtypes it computes in (``None``: any);
* ``priority`` — higher wins among the implementations that can run.

Every op has a plain-torch reference implementation (:mod:`pagoda.ops.reference`, ``is_reference = True``) that
runs anywhere and defines the op's numbers; the op tests hold every other implementation to it.

Implementations are instantiated once per engine (:func:`pagoda.ops.select_ops`) and called as methods; an op's
methods are the same for all of its implementations (the reference implementation documents them).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from pagoda.platforms.interface import Platform

#: op name → what it computes (the contract every implementation follows; the reference gives the numbers).
OPS: dict[str, str] = {
    "rms_norm": "RMSNorm of x [rows, hidden], optionally of x + residual, returning (out, x + residual); "
                "unit_offset: scaled by (1 + weight) in float32 (Gemma)",
    "rotary_embedding": "rotate-half rotary embedding of q [T, heads, d] and k [T, kv_heads, d] by float32 "
                        "cos/sin rows [T, rotary_dim]",
    "silu_and_mul": "silu(x[..., :d]) * x[..., d:]",
    "gelu_and_mul": "gelu(x[..., :d]) * x[..., d:] (exact or tanh)",
    "layer_norm": "LayerNorm of x [rows, hidden] with optional weight and bias, optionally of x + residual, "
                  "returning (out, x + residual)",
    "activation": "a non-gated activation of x, by name: relu, gelu (exact) or gelu_tanh",
    "linear_dense": "x @ W.T + b for a dense weight prepared once (prepare/apply/logits/greedy/rows)",
    "linear_block_quant": "x @ W.T for 4- or 8-bit codes with a scale (and offset) per 32 inputs; 4- or 8-bit codes "
                          "with a scale and zero point per group (prepare_zero); int8 codes with a float32 scale "
                          "and offset per 16 or 32 (prepare_affine)",
    "linear_fp8": "x @ W.T for float8_e4m3fn weights with a float32 scale per group of inputs of each row",
    "linear_int8": "x @ W.T for int8 weights (a scale per row) with int8 activations (per-token dynamic scales)",
    "linear_codebook": "x @ W.T for additive-codebook weights (AQLM): codes, codebooks and a scale per row; a merged "
                       "layer's shards (q/k/v, gate/up) each with their own codebooks (prepare's shard_sizes)",
    "moe_topk": "a router's choice: softmax of logits [T, E] in float32, each token's top-k experts (float32 weights "
                "in descending order, int64 ids), renormalised to sum to one when asked",
    "fused_moe": "mixture-of-experts MLP of x [T, H] over each token's top-k experts (ids and weights [T, k]) with "
                 "stacked gate/up [E, 2I, H] and down [E, H, I] weights prepared once (prepare/apply); each "
                 "expert's gate/up or down product on its own (expert_matmul) and the mixture with LoRA deltas on "
                 "the routed experts (apply_lora; None where an implementation has no such form)",
    "lora_shrink_expand": "y += (x @ A[s].T) @ B[s].T * scale[s] in place for each token by its adapter slot s "
                          "(-1: none), over slots the implementation lays out (create_slots/set_slot), tokens "
                          "grouped by slot once per step (plan/apply)",
    "write_kv": "store a step's keys and values in the paged KV cache at the slot mapping",
    "paged_decode_attention": "one query token per sequence attending to its paged cache (plan once per step "
                              "and window; optional logit soft-capping)",
    "prefill_attention": "causal attention of prefill chunks over their cached context (plan once per step and "
                         "window; optional logit soft-capping)",
}


class OpImpl:
    """One implementation of one op. Subclasses set the class attributes and implement the op's methods."""

    #: The op this implements (a key of :data:`OPS`).
    op: ClassVar[str]
    #: Unique among the op's implementations; what ``--op-impl OP=NAME`` names.
    name: ClassVar[str]
    #: Platform names this runs on; ``None`` for any platform.
    platforms: ClassVar[tuple[str, ...] | None] = None
    #: Capabilities of the resolved platform (and ``package:NAME`` entries) this needs.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Model dtypes this computes in; ``None`` for any.
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    #: Higher wins among implementations that can run.
    priority: ClassVar[int] = 0
    #: The plain-torch implementation that defines the op's numbers.
    is_reference: ClassVar[bool] = False
    #: Linear ops: whether ``prepare``'s handle is the caller's own parameters (kept registered), not a copy.
    keeps_weight: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls, platform: type[Platform], dtype: torch.dtype | None = None) -> str | None:
        """``None`` if this implementation can run on ``platform`` for a model in ``dtype`` (``None``: don't
        check the dtype), else a sentence saying why not."""
        if cls.platforms is not None and platform.name not in cls.platforms:
            return f"runs on {', '.join(cls.platforms)}, not {platform.name}"
        if dtype is not None and cls.dtypes is not None and dtype not in cls.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in cls.dtypes)
            return f"computes in {names} only, not {str(dtype).removeprefix('torch.')}"
        capabilities = platform.capabilities()
        for need in cls.requires:
            if need.startswith("package:"):
                package = need.removeprefix("package:")
                if importlib.util.find_spec(package) is None:
                    return f"needs the {package} package"
            elif need not in capabilities:
                return f"needs {need}, which platform {platform.name} does not report"
        return cls.check(platform)

    @classmethod
    def rank(cls, platform: type[Platform]) -> int:
        """This implementation's priority on ``platform`` (``priority`` unless measurements there say otherwise)."""
        return cls.priority

    @classmethod
    def rank_note(cls, platform: type[Platform]) -> str | None:
        """Why :meth:`rank` differs from ``priority`` on ``platform`` (shown by ``pagoda env``)."""
        return None

    @classmethod
    def check(cls, platform: type[Platform]) -> str | None:
        """Further probes beyond ``requires`` (a kernel library that must build, …): ``None`` or the reason."""
        return None
