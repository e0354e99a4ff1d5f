"""Building blocks shared by model implementations.

Layers that hold weights take their storage and math from the quantization method (``Linear``,
``VocabEmbedding``); attention takes its math from the attention backend (``Attention``); norms, rotary
embeddings and activations call the engine's ops (:func:`pagoda.ops.current_ops`, captured when the layer is
built). Models never see which implementations they got.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagoda.attention_backends.interface import AttentionBackend, AttentionConfig
from pagoda.distributed.parallel_state import get_tp_group
from pagoda.distributed.partition import LinearPartition, VocabPartition
from pagoda.distributed.pipeline import PPMissingLayer, is_last_stage
from pagoda.distributed.tensor_parallel import gathered_logits, masked_embed, reduced_argmax
from pagoda.models.interface import PagodaModel
from pagoda.ops import current_ops
from pagoda.quantization.interface import QuantizationConfig
from pagoda.quantization.unquantized import default_weight_loader


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored however the quantization method likes.

    ``output_sizes`` lists the shards of a merged layer (``[q, k, v]`` for ``qkv_proj``); checkpoints load each
    shard separately by index. ``parallel`` says how tensor-parallel ranks share the layer (``"column"``,
    ``"row"`` or ``"replicated"``, see :mod:`pagoda.distributed.partition`; ``output_units`` are the column
    shards' indivisible units, a head's size for q/k/v): the method creates this rank's part
    (``self.partition``'s local sizes) and its loaders narrow each checkpoint tensor to it; a row-parallel layer
    sums its partial outputs over the ranks (unless ``reduce_output=False``: the caller reduces).
    """

    #: The layer's LoRA adapter slots (``pagoda.lora.layers.LinearLoRA``) when the engine serves adapters.
    lora: Any = None

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, quant_config: QuantizationConfig,
                 prefix: str, params_dtype: torch.dtype, parallel: str = "replicated",
                 output_units: list[int] | None = None, reduce_output: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.prefix = prefix
        tp = get_tp_group()
        if parallel == "column":
            self.partition = LinearPartition.column(input_size, output_sizes, tp.rank_in_group, tp.world_size,
                                                    output_units, prefix)
        elif parallel == "row":
            self.partition = LinearPartition.row(input_size, output_sizes, tp.rank_in_group, tp.world_size, prefix)
        elif parallel == "replicated":
            self.partition = LinearPartition.replicated(input_size, output_sizes, prefix)
        else:
            raise ValueError(f"{prefix}: parallel must be 'column', 'row' or 'replicated', got {parallel!r}")
        # reduce_output=False: the caller sums several row-parallel outputs first and all-reduces once (MoE)
        self.tp_group = tp if self.partition.reduces_output and reduce_output else None
        self.quant_method = quant_config.get_linear_method(prefix)
        self.quant_method.create_weights(self, self.partition.local_input_size, self.partition.local_output_sizes,
                                         bias, params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x)
        lora = self.lora
        if lora is not None and lora.step.plan is not None:  # some row of this step has an adapter
            lora.apply(x, y)  # the delta, in the activations' dtype, beside whatever the base weights are
        if self.tp_group is not None:  # row-parallel: each rank computed a partial sum
            y = self.tp_group.all_reduce(y)
        return y


def stack_kernels(projections: tuple[Linear, ...], lora_step: Any) -> tuple[list[Any], tuple[Any, ...], Any] | None:
    """A decoder layer's linear layers as a :class:`~pagoda.models.interface.DecoderStack` holds them: each one's
    kernel (its quantization method's op and handle), their LoRA adapter slots (None without), and the engine's
    ``LoRAStep`` once any layer's slots have shown it (``lora_step``: what the earlier layers showed). None where a
    layer has no kernel handle, and so can't be fused."""
    linears = [m.quant_method.kernel(m) for m in projections]
    if any(k is None for k in linears):
        return None
    lora = tuple(m.lora for m in projections)
    return linears, lora, lora_step or next((slots.step for slots in lora if slots is not None), None)


class VocabEmbedding(nn.Module):
    """Token embedding table; also computes logits when used as (or tied to) the LM head.

    Vocabulary-parallel under tensor parallelism (``vocab_parallel``, the default; position tables pass False and
    stay whole): ``vocab_partition`` (set before the method creates the weights) gives this rank's rows, the
    method holds and loads only those, and lookups, logits and greedy tokens combine the ranks' parts
    (:mod:`pagoda.distributed.tensor_parallel`). With one rank nothing is added to any call."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_config: QuantizationConfig, prefix: str,
                 params_dtype: torch.dtype, vocab_parallel: bool = True) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        tp = get_tp_group()
        self.vocab_partition = (VocabPartition(num_embeddings, tp.rank_in_group, tp.world_size) if vocab_parallel
                                else VocabPartition(num_embeddings, 0, 1))
        self.tp_group = None if self.vocab_partition.is_whole else tp
        self.quant_method = quant_config.get_embedding_method(prefix)
        self.quant_method.create_weights(self, self.vocab_partition.rows, embedding_dim, params_dtype)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            return masked_embed(lambda ids: self.quant_method.embed(self, ids), self.vocab_partition,
                                self.tp_group, token_ids)
        return self.quant_method.embed(self, token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            return gathered_logits(self.quant_method.logits(self, hidden), self.vocab_partition, self.tp_group)
        return self.quant_method.logits(self, hidden)

    def greedy(self, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        """The argmax of :meth:`logits` per row (over the tokens a bitmask ``allowed`` allows, where given), or
        None when only :meth:`logits` can give it."""
        if self.tp_group is not None:  # from this rank's logits slice, never the gathered whole
            return reduced_argmax(self.quant_method.logits(self, hidden), self.vocab_partition, self.tp_group,
                                  allowed)
        return self.quant_method.greedy(self, hidden, allowed)

    def use_as_lm_head(self) -> VocabEmbedding:
        """Mark this table as (also) the LM head, so its method prepares it for :meth:`logits` after loading."""
        self.serves_logits = True
        return self


class RMSNorm(nn.Module):
    """RMSNorm (accumulating in float32), with an optional fused residual add: the ``rms_norm`` op.

    ``unit_offset`` (Gemma): the checkpoint's weight ``w`` scales by ``1 + w``, multiplied in float32 before the
    rounding to the activations' dtype — the op does it, so the stored weight stays the checkpoint's."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.op = current_ops().rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.unit_offset:
            return self.op(x, self.weight, self.eps, residual, unit_offset=True)
        return self.op(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) with a precomputed float32 cos/sin table by position.

    One instance serves every layer: ``lookup(positions)`` gathers the step's cos/sin rows once, and each layer's
    ``forward`` applies them through the ``rotary_embedding`` op. ``partial_rotary_factor`` rotates only the first
    fraction of each head.
    """

    # "su" is LongRoPE's older name (the first Phi-3 long-context checkpoints).
    SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope", "su")

    def __init__(self, config: Any, head_size: int, max_positions: int, dtype: torch.dtype,
                 layer_type: str | None = None) -> None:
        """``layer_type``: the key of ``config.rope_parameters`` to use where it holds one set per layer type
        (Gemma 3: ``"sliding_attention"`` and ``"full_attention"``, each with its own base and scaling)."""
        super().__init__()
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if layer_type is not None:
            params = dict(params[layer_type] or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in self.SUPPORTED:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                             f"{', '.join(self.SUPPORTED)}")
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(head_size * partial)
        max_positions = max(max_positions, int(params.get("original_max_position_embeddings") or 0))
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        # The table is computed on the host (as the reference implementation computes it), then placed.
        if rope_type in ("longrope", "su"):
            freqs, scaling = longrope_freqs(config, params, theta, rotary_dim, t)
        else:
            if rope_type == "default":
                inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float()
                                            / rotary_dim))
                scaling = 1.0
            else:
                # The scaled variants' frequency formulas are exactly transformers'; reuse them so we match bit
                # for bit.
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                extra = {} if layer_type is None else {"layer_type": layer_type}
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **extra)
            freqs = torch.outer(t, inv_freq.float().cpu())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rotary_dim = rotary_dim
        # sin carries rotate-half's sign: x*cos + rotate_half(x)*sin == x*cos + cat(x2, x1)*sin_signed.
        sin = emb.sin() * scaling
        sin[:, : rotary_dim // 2] *= -1
        device = torch.empty(0).device  # the device the model is being built on
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        self.op = current_ops().rotary_embedding

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 cos/sin rows [T, rotary_dim] of a step's positions."""
        return self.cos[positions], self.sin[positions]

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """``q`` [T, heads, d], ``k`` [T, kv_heads, d] → rotated (possibly in place), with ``rope =
        lookup(positions)``."""
        return self.op(q, k, *rope)


def longrope_freqs(config: Any, params: dict[str, Any], theta: float, rotary_dim: int,
                   t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3's ``longrope`` / ``su``): per-frequency rescaling by ``short_factor`` within the
    pretraining window ``original_max_position_embeddings`` and by ``long_factor`` beyond it, and cos/sin scaled
    by the attention factor (given, else ``sqrt(1 + ln(factor) / ln(original))`` for a context extended by
    ``factor`` = max_position_embeddings / original). Returns the angle table [len(t), rotary_dim / 2] and that
    factor.

    Which positions use the long factors: transformers recomputes the frequencies per forward call from the
    largest position in it (long once the sequence exceeds the original window), and vLLM switches a whole batch
    to the long table when any of its positions is beyond the window. Both make a token's rotation depend on how
    it was batched; here the choice is per position — position ``p`` rotates with the long factors iff
    ``p >= original`` — so every batch shape gives the same numbers. This equals transformers' generation token for
    token whenever the prompt fits in the original window (its prompt pass is short, then each decoded token at
    position p sees a sequence of p + 1 tokens); for a prompt longer than the window transformers would rotate the
    prompt's first ``original`` positions with the long factors too.
    """
    original = int(getattr(config, "original_max_position_embeddings", None)
                   or params.get("original_max_position_embeddings") or 0)
    missing = [key for key in ("short_factor", "long_factor") if not params.get(key)]
    if not original:
        missing.append("original_max_position_embeddings")
    if missing:
        raise ValueError(f"rope_scaling type {params.get('rope_type', params.get('type'))!r} needs "
                         f"{', '.join(missing)}")
    half = rotary_dim // 2
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != half:
            raise ValueError(f"rope_scaling {key}: {len(params[key])} values, expected rotary_dim / 2 = {half}")
    factor = params.get("factor") or config.max_position_embeddings / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * theta ** exponent)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * theta ** exponent)
    freqs = torch.where((t >= original)[:, None], torch.outer(t, long), torch.outer(t, short))
    return freqs, float(scaling)


class Attention(nn.Module):
    """Paged attention for one layer, delegated to the selected attention backend's implementation."""

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int, backend: type[AttentionBackend],
                 config: AttentionConfig, sliding_window: int | None = None, scale: float | None = None) -> None:
        """``scale``: the softmax scale (``head_size ** -0.5`` unless the model says otherwise)."""
        super().__init__()
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        scale = head_size ** -0.5 if scale is None else scale
        self.impl = backend.impl_cls()(num_heads, head_size, scale, num_kv_heads, sliding_window, config)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        return self.impl.forward(q, k, v, kv_cache, metadata)


class GatedActivation(nn.Module):
    """``act(x[..., :d]) * x[..., d:]``: the ``silu_and_mul`` or ``gelu_and_mul`` op."""

    SUPPORTED = {"silu": ("silu_and_mul", None), "gelu": ("gelu_and_mul", "none"),
                 "gelu_pytorch_tanh": ("gelu_and_mul", "tanh"), "gelu_new": ("gelu_and_mul", "tanh")}

    def __init__(self, act: str) -> None:
        super().__init__()
        if act not in self.SUPPORTED:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {', '.join(self.SUPPORTED)}")
        self.act = act
        op_name, self.approximate = self.SUPPORTED[act]
        self.op = getattr(current_ops(), op_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) if self.approximate is None else self.op(x, self.approximate)


def merged_param_name(name: str, stacked_params: tuple[tuple[str, str, int], ...]) -> tuple[str, int | None]:
    """A checkpoint tensor's name under our merged projections (``stacked_params``: (merged, original, shard)
    triples, e.g. ``("qkv_proj", "q_proj", 0)``) and its shard of the merged parameter (None: all of it)."""
    for merged, original, shard in stacked_params:
        if f".{original}." in name:
            return name.replace(f".{original}.", f".{merged}."), shard
    return name, None


def load_param(model: nn.Module, params: dict[str, Any], name: str, tensor: Any, shard: int | None = None) -> str:
    """Hand ``tensor`` to parameter ``name``'s weight loader (as ``shard`` of a merged parameter when given); a
    name the model has no parameter for is an error naming it. Returns ``name``."""
    param = params.get(name)
    if param is None:
        raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
    loader = getattr(param, "weight_loader", default_weight_loader)
    loader(param, tensor) if shard is None else loader(param, tensor, shard)
    return name


class CausalLM(PagodaModel):
    """A decoder with a language-model head: ``lm_head`` is the embedding table when the config ties them, its
    own table otherwise, and logits and greedy tokens come from it."""

    def init_lm_head(self, embed: VocabEmbedding, width: int, quant_config: QuantizationConfig,
                     dtype: torch.dtype) -> None:
        """Set ``lm_head`` (``self.config`` and ``self.tie_word_embeddings`` already set) reading ``width``-wide
        hidden states. Pipeline stages before the last have no LM head."""
        if not is_last_stage():
            self.lm_head = PPMissingLayer()
            return
        self.lm_head = (embed if self.tie_word_embeddings else
                        VocabEmbedding(self.config.vocab_size, width, quant_config, "lm_head", dtype))
        self.lm_head.use_as_lm_head()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, width] → float32 logits [n, vocab_size]."""
        return self.lm_head.logits(hidden)

    def compute_greedy(self, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
        """``compute_logits(hidden).argmax(-1)`` without the logits, where the LM head's kernel allows (else
        None); over the tokens a bitmask ``allowed`` allows, where given."""
        return self.lm_head.greedy(hidden, allowed)
