"""The AttentionBackend interface: paged attention over the KV cache, one implementation per kernel library.

A backend has four roles (the split vLLM v1 uses):

* :class:`AttentionBackend` — a static descriptor: name, what it supports, the KV-cache shape, and
  ``validate(config)`` returning the reasons it can't run. Registered by the
  ``pagoda_register_attention_backends`` hook.
* :class:`AttentionMetadataBuilder` — runs once per step, turning the runner's
  :class:`CommonAttentionMetadata` into whatever the kernel wants (``build``).
* the metadata object it returns — opaque to the engine, handed back to every layer's ``forward``.
* :class:`AttentionImpl` — one per attention layer; ``forward`` writes this step's keys/values into the
  layer's cache and returns the attention output.

The batch is one flat variable-length sequence of tokens (no padding)::

    tokens:            | r0 (decode) | r1 (decode) | r2 (prefill chunk, 5 tokens)  |
    query_start_loc:   0             1             2                               7
    seq_lens:          r0: computed+1, r1: computed+1, r2: computed+5   (context incl. this step)
    block_table[i]:    physical block ids of request i, in order
    slot_mapping[t]:   block_table[req(t)][pos(t) // block_size] * block_size + pos(t) % block_size

Requests whose query length is 1 (decodes) come first, ``num_decodes`` of them.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class AttentionConfig:
    """What a backend needs to know to decide whether it can run a model."""

    platform: str
    dtype: torch.dtype
    head_size: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    #: The window of the model's windowed layers (keys ``> position - window`` are seen); ``None``: none is.
    sliding_window: int | None = None
    is_encoder: bool = False  # bidirectional attention without a KV cache (pooling models)
    kv_cache_dtype: str = "auto"
    #: Each layer's window when the layers differ (Gemma 2/3 interleave windowed and global layers); ``None``: every
    #: layer uses ``sliding_window``.
    layer_windows: tuple[int | None, ...] | None = None
    #: Attention logits soft-capping (Gemma 2): ``cap * tanh(scores / cap)`` before the softmax; ``None``: off.
    logits_soft_cap: float | None = None

    def windows(self) -> list[int | None]:
        """The distinct windows the layers use (``None``: global attention), in a fixed order; a metadata
        builder plans once for each, and each layer uses its own (``sliding_window`` is always among them, for
        models that give every layer the model-wide window)."""
        found = {self.sliding_window} | set(self.layer_windows or ())
        return sorted(found, key=lambda w: -1 if w is None else w)


@dataclass
class CommonAttentionMetadata:
    """The per-step batch layout, built by the model runner for every backend alike."""

    num_reqs: int
    num_tokens: int
    num_decodes: int  # requests with one query token; they come first
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], on the device
    query_start_loc_cpu: torch.Tensor  # same, on the host
    seq_lens: torch.Tensor  # int32 [num_reqs]: tokens in the cache after this step, on the device
    seq_lens_cpu: torch.Tensor
    num_computed_tokens_cpu: torch.Tensor  # int32 [num_reqs]: tokens already cached before this step
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], on the device
    slot_mapping: torch.Tensor  # int64 [num_tokens], on the device
    causal: bool = True


class AttentionMetadataBuilder(ABC):
    """Builds the backend's metadata once per step."""

    def __init__(self, config: AttentionConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    @abstractmethod
    def build(self, common: CommonAttentionMetadata) -> Any:
        """Return the metadata object every layer's :meth:`AttentionImpl.forward` receives this step."""


class AttentionImpl(ABC):
    """Attention for one layer."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None, config: AttentionConfig) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = config.logits_soft_cap
        self.config = config

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: Any) -> torch.Tensor:
        """``query`` [num_tokens, num_heads, head_size], ``key``/``value`` [num_tokens, num_kv_heads, head_size].

        Writes key/value into ``kv_cache`` at ``slot_mapping`` (when there is a cache), then attends each token to
        its request's cached context (causally, unless the metadata says otherwise). Returns
        [num_tokens, num_heads * head_size].
        """


class AttentionBackend(ABC):
    """Static description of an attention implementation."""

    name: ClassVar[str]
    #: Platform names this backend runs on; ``None`` means any.
    platforms: ClassVar[tuple[str, ...] | None] = None
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    #: ``None`` means any head size.
    head_sizes: ClassVar[tuple[int, ...] | None] = None
    #: ``None`` means any block size.
    block_sizes: ClassVar[tuple[int, ...] | None] = None
    kv_cache_layout: ClassVar[str] = "NHD"
    supports_sliding_window: ClassVar[bool] = False
    #: Whether the kernel can soft-cap attention logits (``cap * tanh(scores / cap)``, Gemma 2).
    supports_logits_soft_cap: ClassVar[bool] = False
    #: Why not, when it can't (named by ``validate``).
    logits_soft_cap_reason: ClassVar[str] = "its kernel has no soft-capping"
    supports_encoder: ClassVar[bool] = False
    #: The pip extra that installs what this backend needs, named in "not installed" reasons.
    extra: ClassVar[str | None] = None
    #: The kernel library as (import name, package name, how to install it); probed without importing it.
    requires: ClassVar[tuple[str, str, str] | None] = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when the kernel library can be imported; otherwise why not. The default checks ``requires``
        without importing the library (backends import it lazily, when they run)."""
        if cls.requires is not None and importlib.util.find_spec(cls.requires[0]) is None:
            return f"{cls.requires[1]} is not installed: {cls.requires[2]}"
        return None

    @classmethod
    def validate(cls, config: AttentionConfig) -> list[str]:
        """Every reason this backend can't run ``config``; empty when it can."""
        reasons: list[str] = []
        missing = cls.unavailable_reason()
        if missing:
            reasons.append(missing)
        if cls.platforms is not None and config.platform not in cls.platforms:
            reasons.append(f"runs on {', '.join(cls.platforms)}, not {config.platform}")
        if config.dtype not in cls.dtypes:
            reasons.append(f"dtype {str(config.dtype).removeprefix('torch.')} not in "
                           f"{[str(d).removeprefix('torch.') for d in cls.dtypes]}")
        if cls.head_sizes is not None and config.head_size not in cls.head_sizes:
            reasons.append(f"head size {config.head_size} not in {list(cls.head_sizes)}")
        if cls.block_sizes is not None and config.block_size not in cls.block_sizes:
            reasons.append(f"block size {config.block_size} not in {list(cls.block_sizes)}")
        if any(w is not None for w in config.windows()) and not cls.supports_sliding_window:
            reasons.append("sliding-window attention is not supported")
        if config.logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            reasons.append(f"attention logit soft-capping is not supported: {cls.logits_soft_cap_reason}")
        if config.is_encoder and not cls.supports_encoder:
            reasons.append("encoder (bidirectional) attention is not supported")
        if config.num_heads % config.num_kv_heads:
            reasons.append(f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}")
        reasons.extend(cls.extra_reasons(config))
        return reasons

    @classmethod
    def extra_reasons(cls, config: AttentionConfig) -> list[str]:
        """Backend-specific checks beyond the declared capabilities."""
        return []

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together); dimension 1 indexes the blocks (the
        runner copies and zeroes blocks along it). The default is ``[2, blocks, block_size, kv_heads, head]``."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    @abstractmethod
    def builder_cls(cls) -> type[AttentionMetadataBuilder]: ...

    @classmethod
    @abstractmethod
    def impl_cls(cls) -> type[AttentionImpl]: ...

    @classmethod
    def describe(cls) -> dict[str, object]:
        return {
            "name": cls.name,
            "platforms": list(cls.platforms) if cls.platforms else "any",
            "dtypes": [str(d).removeprefix("torch.") for d in cls.dtypes],
            "head_sizes": list(cls.head_sizes) if cls.head_sizes else "any",
            "block_sizes": list(cls.block_sizes) if cls.block_sizes else "any",
            "kv_cache_layout": cls.kv_cache_layout,
            "sliding_window": cls.supports_sliding_window,
            "logits_soft_cap": cls.supports_logits_soft_cap,
            "encoder": cls.supports_encoder,
        }
