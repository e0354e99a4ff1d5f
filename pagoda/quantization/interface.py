"""The QuantizationMethod interface: how a weight format is stored, loaded and multiplied.

A :class:`QuantizationConfig` (one per format, registered by ``pagoda_register_quantization_methods``) is
built from a checkpoint's ``quantization_config`` (or from the file format, for GGUF) and hands each layer of
the model its method. A :class:`LinearMethod` owns a linear layer's parameters: ``create_weights`` registers
them on the layer, each with a ``weight_loader(param, loaded, shard_id)`` attribute the model's
``load_weights`` calls; ``process_weights_after_loading`` (called once the weights are on the device they run
on) hands them to the op that multiplies by them (``linear_dense``, ``linear_block_quant``, … from
:func:`pagoda.ops.current_ops`);
``apply`` computes ``x @ W.T + b``; ``kernel`` exposes the op and its weight handle so a platform can fuse the
layer into a decode step (:meth:`Platform.fused_decode`). Linear layers never look inside.

Merged layers (q/k/v → qkv, gate/up → gate_up) have several output shards, ``output_sizes``; the checkpoint
holds them separately and ``shard_id`` (0, 1, 2 …) says which one a loaded tensor is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        """Register the layer's parameters (each with a ``weight_loader`` attribute)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the kernel (transpose, pack, cast …), on the device they run on."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x`` [num_tokens, input_size] → [num_tokens, sum(output_sizes)], bias included."""

    def kernel(self, layer: nn.Module) -> Any | None:
        """The layer as a :class:`~pagoda.models.interface.LinearKernel` (op implementation, weight handle, bias)
        when one op call computes :meth:`apply`; ``None`` when it doesn't (the layer can't be fused)."""
        return None


class EmbeddingMethod(ABC):
    """Token embedding, and the LM head computed from the same table when embeddings are tied."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None: ...

    @abstractmethod
    def embed(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ``token_ids`` (gathered, never the whole table dequantized)."""

    @abstractmethod
    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, embedding_dim] → [n, num_embeddings] in float32."""

    def greedy(self, layer: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        """``logits(hidden).argmax(-1)`` (int64 [n]) when a kernel finds it without writing the logits out;
        None (the default) when it can't, and the caller samples from :meth:`logits` as usual. ``allowed``: a token
        bitmask per row (int32 [n, ceil(vocab / 32)], a grammar's constraint); the argmax is then over the allowed
        tokens only."""
        return None


class QuantizationConfig(ABC):
    #: The name users pass as ``--quantization`` and checkpoints give as ``quant_method``.
    name: ClassVar[str]
    #: Activation dtypes the kernels accept.
    act_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    #: Platform names it runs on; ``None`` means any.
    platforms: ClassVar[tuple[str, ...] | None] = None
    #: Whether the checkpoint format yields mixture-of-experts weights dense (GGUF dequantizes its 3-D expert stacks
    #: on load), so MoE layers, which hold their experts unquantized, can load them.
    dense_moe_experts: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Build from a checkpoint's ``quantization_config`` dict (empty for formats that carry none)."""

    @classmethod
    def unavailable_reason(cls, platform_name: str) -> str | None:
        """``None`` if the method can run on that platform, else why not."""
        if cls.platforms is not None and platform_name not in cls.platforms:
            return f"quantization {cls.name} runs on {', '.join(cls.platforms)}, not {platform_name}"
        return None

    @classmethod
    def reason_unavailable_on(cls, platform: Any) -> str | None:
        """``None`` if the method can run on the resolved ``platform`` (the method's own check, and the platform's
        ``supported_quantization`` list), else why not."""
        reason = cls.unavailable_reason(platform.name)
        if reason is None and platform.supported_quantization is not None \
                and cls.name not in platform.supported_quantization:
            reason = (f"platform {platform.name} supports {', '.join(platform.supported_quantization)} only, "
                      f"not {cls.name}")
        return reason

    @abstractmethod
    def get_linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer at ``prefix`` (e.g. ``model.layers.0.self_attn.qkv_proj``)."""

    @abstractmethod
    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        """The method for the embedding table (and tied LM head) at ``prefix``."""


class CheckpointFormat(ABC):
    """A weight file format that carries its own model config and tokenizer (GGUF).

    A quantization method that owns such a format sets ``QuantizationConfig.checkpoint_format``; the model
    loader asks every registered format whether it claims a path before falling back to a Hugging Face
    directory. ``iter_weights`` yields ``(hf_name, value)`` with Hugging Face parameter names
    (``model.layers.0.self_attn.q_proj.weight``) so models load every format the same way; values are
    whatever the format's methods' ``weight_loader``s accept.
    """

    @classmethod
    @abstractmethod
    def detect(cls, path: str) -> str | None:
        """The weight file ``path`` (a file or a directory) resolves to if it is in this format, else ``None``."""

    @classmethod
    @abstractmethod
    def load_hf_config(cls, file: str) -> Any:
        """A ``transformers.PretrainedConfig`` built from the file's metadata; unsupported architectures raise
        ``ValueError`` naming them."""

    @classmethod
    @abstractmethod
    def load_tokenizer(cls, file: str) -> Any:
        """A ``transformers`` tokenizer built from the file's metadata (vocabulary, merges, special tokens,
        chat template)."""

    @classmethod
    @abstractmethod
    def iter_weights(cls, file: str, hf_config: Any) -> Any:
        """Yield ``(hf_name, value)`` for every tensor in the file."""

    @classmethod
    def load_generation_config(cls, file: str) -> dict[str, Any]:
        """Sampling defaults the file carries, under ``generation_config.json``'s key names (``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``); none by default."""
        return {}


QuantizationConfig.checkpoint_format = None  # type: ignore[attr-defined]  # set by formats like GGUF
