"""Resolved engine configuration: ``EngineArgs`` plus what the model files and the platform say.

``EngineConfig.from_engine_args`` is the one place a user's arguments meet the checkpoint: it finds the model
(local directory, GGUF file, hub cache, or the bundled default), reads its config, resolves dtype, context
length, quantization, platform and attention backend, and hands each component only the sub-config it needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from pagoda.attention_backends import AttentionConfig, select_attention_backend
from pagoda.core.engine_args import EngineArgs
from pagoda.core.model_files import resolve_model_path
from pagoda.core.structured_output.config import StructuredOutputsConfig
from pagoda.distributed.config import ParallelConfig
from pagoda.distributed.tensor_parallel import check_tensor_parallel, heads_per_rank
from pagoda.logger import init_logger
from pagoda.models.causal_pooling import is_causal_lm, model_class_for_task
from pagoda.models.interface import PagodaModel
from pagoda.ops import OpSet, select_ops
from pagoda.platforms import Platform, resolve_platform
from pagoda.plugins.registry import Registry, get_registry

logger = init_logger(__name__)

_DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32,
           "float32": torch.float32}


@dataclass
class ModelConfig:
    model: str  # what the user named (or the bundled default's path)
    path: str  # local directory or weight file
    checkpoint_format: Any | None  # a CheckpointFormat class (GGUF) or None for Hugging Face directories
    weight_file: str | None  # the single weight file of a CheckpointFormat
    hf_config: Any
    tokenizer: str | None
    tokenizer_mode: str
    trust_remote_code: bool
    revision: str | None
    tokenizer_revision: str | None
    dtype: torch.dtype
    max_model_len: int
    sliding_window: int | None
    quantization: str
    quantization_config: dict[str, Any]
    load_format: str
    generation_config: str
    override_generation_config: dict[str, Any]
    served_model_name: str
    task: str  # resolved: "generate", "embed", "classify", "score", "reward"
    skip_tokenizer_init: bool
    is_encoder_only: bool  # bidirectional attention and no KV cache (BERT-style encoders)
    override_pooler_config: dict[str, Any] = field(default_factory=dict)  # read by pooling models' poolers
    # Each layer's window (None: global), from the text config's layer_types where layers differ (Gemma 2/3).
    layer_sliding_windows: tuple[int | None, ...] = ()
    attn_logits_soft_cap: float | None = None  # attention logit soft-capping (Gemma 2's attn_logit_softcapping)

    @property
    def text_config(self) -> Any:
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_size(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size


@dataclass
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    num_blocks_override: int | None
    cpu_kvcache_space_gib: float | None
    num_blocks: int = 0  # set once the model is loaded and the budget known


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    platform: type[Platform]
    attention_backend: type
    attention: AttentionConfig
    seed: int | None
    cpu_offload_gb: float
    enforce_eager: bool
    max_logprobs: int
    disable_log_stats: bool
    registry: Registry = field(repr=False, default=None)  # type: ignore[assignment]
    ops: OpSet = field(repr=False, default=None)  # type: ignore[assignment]  # one implementation per op
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative_config: Any = None  # a SpeculativeConfig when speculative decoding is on
    draft: EngineConfig | None = field(repr=False, default=None)  # the draft model's own config (draft_model)
    lora: Any = None  # a LoRAConfig when LoRA adapters are enabled
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, registry: Registry | None = None) -> EngineConfig:
        from pagoda import envs

        registry = registry or get_registry()
        platform = resolve_platform(args.device, registry)
        model_config = _resolve_model_config(args, platform, registry)
        if args.cpu_offload_gb and platform.uses_host_memory:
            raise ValueError(f"cpu_offload_gb: weights already live in host memory on platform {platform.name}; "
                             "offloading only applies to device platforms")
        max_batched = args.max_num_batched_tokens
        if max_batched is None:
            max_batched = platform.default_max_num_batched_tokens(args.usage_context)
            if not args.enable_chunked_prefill:
                max_batched = max(max_batched, model_config.max_model_len)
        elif not args.enable_chunked_prefill and max_batched < model_config.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len "
                             f"({model_config.max_model_len}) with enable_chunked_prefill=False: a long prompt could "
                             "never be scheduled; raise max_num_batched_tokens, lower max_model_len or enable "
                             "chunked prefill")
        parallel = ParallelConfig.from_engine_args(args)
        # Backends validate and size for the heads one rank attends over (all of them on one rank)
        num_heads, num_kv_heads = heads_per_rank(model_config.num_heads, model_config.num_kv_heads,
                                                 parallel.tensor_parallel_size)
        attention = AttentionConfig(
            platform=platform.name, dtype=model_config.dtype, head_size=model_config.head_size,
            num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=args.block_size,
            sliding_window=model_config.sliding_window, is_encoder=model_config.is_encoder_only,
            layer_windows=model_config.layer_sliding_windows or None,
            logits_soft_cap=model_config.attn_logits_soft_cap,
        )
        backend = select_attention_backend(platform, attention, args.attention_backend, registry)
        ops = select_ops(platform, model_config.dtype, args.op_impl, registry)
        config = cls(
            model=model_config,
            cache=CacheConfig(args.block_size, args.enable_prefix_caching, args.gpu_memory_utilization,
                              args.kv_cache_memory_bytes, args.num_gpu_blocks_override,
                              envs.cpu_kvcache_space_gib()),
            scheduler=SchedulerConfig(args.max_num_seqs, max_batched, model_config.max_model_len,
                                      args.enable_chunked_prefill),
            platform=platform, attention_backend=backend, attention=attention, seed=args.seed,
            cpu_offload_gb=args.cpu_offload_gb, enforce_eager=args.enforce_eager, max_logprobs=args.max_logprobs,
            disable_log_stats=args.disable_log_stats, registry=registry, ops=ops,
            parallel=parallel,
            structured_outputs=StructuredOutputsConfig.from_args(args.structured_outputs_config,
                                                                 args.guided_decoding_backend),
        )
        if args.speculative_config is not None:
            from pagoda.core.spec_decode.config import SpeculativeConfig, draft_engine_config

            config.speculative_config = SpeculativeConfig.from_dict(args.speculative_config)
            if model_config.task != "generate":
                raise ValueError(f"speculative_config: only applies to text generation; this model serves the "
                                 f"{model_config.task!r} task")
            if config.speculative_config.method == "draft_model":
                config.draft = draft_engine_config(args, config)
        if args.enable_lora:
            from pagoda.lora.config import LoRAConfig

            config.lora = LoRAConfig.from_engine_args(args)
        check_tensor_parallel(config)
        if config.parallel.pipeline_parallel_size > 1:
            from pagoda.core.pipeline_step import check_pipeline_config

            architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
            check_pipeline_config(config, model_class_for_task(registry, architectures, model_config.task))
        return config


def _resolve_model_config(args: EngineArgs, platform: type[Platform], registry: Registry) -> ModelConfig:
    from transformers import AutoConfig

    model = args.model
    path = resolve_model_path(model, args.revision, args.download_dir)
    checkpoint_format, weight_file = _detect_checkpoint_format(path, args.load_format, registry)
    if checkpoint_format is not None:
        hf_config = checkpoint_format.load_hf_config(weight_file)
        quantization = checkpoint_format_owner(checkpoint_format, registry)
        quant_dict: dict[str, Any] = {}
    else:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code,
                                               revision=args.revision)
        quant_dict = read_quantization_config(path, hf_config)
        quantization = str(quant_dict.get("quant_method", "none")).lower()
    if args.quantization and args.quantization.lower() != quantization:
        if quantization != "none":
            raise ValueError(f"quantization: the checkpoint is {quantization}-quantized but {args.quantization!r} "
                             "was requested")
        quantization = args.quantization.lower()
    method = registry.get_quantization_method(quantization)
    reason = method.reason_unavailable_on(platform)
    if reason:
        raise ValueError(f"quantization {quantization} can't run on platform {platform.name}: {reason}")

    text_config = getattr(hf_config, "text_config", None) or hf_config
    dtype = _resolve_dtype(args.dtype, text_config, platform, method)
    task, model_cls = _resolve_task(args.task, hf_config, registry)
    max_model_len = _resolve_max_model_len(args.max_model_len, text_config, model_cls, path)
    sliding_window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        sliding_window = None
    if sliding_window is not None and args.disable_sliding_window:
        max_model_len = min(max_model_len, sliding_window)
        sliding_window = None
    if sliding_window is not None and sliding_window >= max_model_len:
        sliding_window = None  # the window never bites: plain causal attention is the same thing
    layer_windows = _layer_sliding_windows(text_config, sliding_window)
    served = args.served_model_name
    if isinstance(served, list):
        served = served[0] if served else None
    return ModelConfig(
        model=model or path, path=path, checkpoint_format=checkpoint_format, weight_file=weight_file,
        hf_config=hf_config, tokenizer=args.tokenizer, tokenizer_mode=args.tokenizer_mode,
        trust_remote_code=args.trust_remote_code, revision=args.revision, tokenizer_revision=args.tokenizer_revision,
        dtype=dtype, max_model_len=max_model_len, sliding_window=sliding_window, quantization=quantization,
        quantization_config=quant_dict, load_format=args.load_format, generation_config=args.generation_config,
        override_generation_config=dict(args.override_generation_config or {}),
        served_model_name=served or (model or os.path.basename(path)), task=task,
        skip_tokenizer_init=args.skip_tokenizer_init,
        is_encoder_only=model_cls.is_encoder_only,
        override_pooler_config=dict(args.override_pooler_config or {}),
        layer_sliding_windows=layer_windows,
        attn_logits_soft_cap=getattr(text_config, "attn_logit_softcapping", None),
    )


#: The values of a text config's ``layer_types`` pagoda's attention knows.
LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_sliding_windows(text_config: Any, sliding_window: int | None) -> tuple[int | None, ...]:
    """Each decoder layer's window: ``sliding_window`` on the layers ``layer_types`` marks as sliding (every layer
    when the config has no ``layer_types``), ``None`` (global attention) elsewhere."""
    num_layers = getattr(text_config, "num_hidden_layers", 0) or 0
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        return (sliding_window,) * num_layers
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {', '.join(map(repr, unknown))} are not supported; supported: "
                         f"{', '.join(LAYER_TYPES)}")
    return tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)


# Files the quantization tools write beside (or instead of) config.json's quantization_config.
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


def read_quantization_config(path: str, hf_config: Any) -> dict[str, Any]:
    """The checkpoint's quantization config: ``quantization_config`` in config.json, else the first of
    :data:`QUANT_CONFIG_FILES` in the directory (AutoGPTQ and old AutoAWQ files), its method inferred from its keys
    when it doesn't name one. Empty for a dense checkpoint."""
    config = getattr(hf_config, "quantization_config", None)
    if config:
        return dict(config if isinstance(config, dict) else config.to_dict())
    for name in QUANT_CONFIG_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                config = json.load(f)
            if "quant_method" not in config:
                if "w_bit" in config or "q_group_size" in config:
                    config["quant_method"] = "awq"
                elif "bits" in config and "group_size" in config:
                    config["quant_method"] = "gptq"
                else:
                    raise ValueError(f"{file}: can't tell the quantization method (no quant_method)")
            return config
    return {}


def _resolve_task(requested: str, hf_config: Any, registry: Registry) -> tuple[str, type]:
    """The task the model runs (``auto``: the model class's first supported task) and the model class. A task
    the model can't do is an error naming the ones it can."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        raise ValueError("the model config has no 'architectures'; can't tell which model to build")
    # A causal LM asked for embed/classify/score runs as its pooling conversion (models/causal_pooling.py).
    model_cls = model_class_for_task(registry, architectures, requested)
    if not (isinstance(model_cls, type) and issubclass(model_cls, PagodaModel)):
        raise TypeError(f"model class {model_cls!r} for {architectures[0]} must derive from "
                        "pagoda.models.interface.PagodaModel")
    supported = tuple(model_cls.supported_tasks)
    task = supported[0] if requested == "auto" else requested
    if task not in supported:
        converted = "; converted to a pooling model: embed, classify, score" if is_causal_lm(model_cls) else ""
        raise ValueError(f"task: {architectures[0]} can't do {requested!r}; it supports {', '.join(supported)}"
                         f"{converted}")
    return task, model_cls


def _detect_checkpoint_format(path: str, load_format: str, registry: Registry) -> tuple[Any | None, str | None]:
    for method in registry.quantization_methods.values():
        fmt = getattr(method, "checkpoint_format", None)
        if fmt is None:
            continue
        weight_file = fmt.detect(path)
        if weight_file is not None:
            return fmt, weight_file
    if load_format == "gguf":
        raise ValueError(f"load_format=gguf but {path} is not a GGUF file or a directory holding one")
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file but not a recognized weight format; pass a model directory or a "
                         ".gguf file")
    return None, None


def checkpoint_format_owner(fmt: Any, registry: Registry) -> str:
    for name, method in registry.quantization_methods.items():
        if getattr(method, "checkpoint_format", None) is fmt:
            return name
    raise RuntimeError("checkpoint format without a quantization method")


def _resolve_dtype(requested: str, text_config: Any, platform: type[Platform], method: type) -> torch.dtype:
    if requested != "auto":
        dtype = _DTYPES[requested]
        if dtype not in platform.supported_dtypes:
            raise ValueError(f"dtype: {requested} is not supported on platform {platform.name}; supported: "
                             f"{[str(d).removeprefix('torch.') for d in platform.supported_dtypes]}")
        return dtype
    stored = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored, torch.float32)
    dtype = platform.default_dtype(stored if isinstance(stored, torch.dtype) else torch.float32)
    if dtype not in method.act_dtypes:
        dtype = next(d for d in method.act_dtypes if d in platform.supported_dtypes)
    return dtype


def _resolve_max_model_len(requested: int | None, text_config: Any, model_cls: type, path: str) -> int:
    """The context length: the model's, capped by what its class can take and by a sentence-transformers
    ``max_seq_length``; a larger request is an error."""
    derived = getattr(text_config, "max_position_embeddings", None) or 2048
    limit = model_cls.max_model_len_limit(text_config)
    if limit is not None:
        derived = min(derived, limit)
    st_config = os.path.join(path, "sentence_bert_config.json") if os.path.isdir(path) else None
    if st_config and os.path.exists(st_config):
        with open(st_config) as f:
            derived = min(derived, int(json.load(f).get("max_seq_length") or derived))
    if requested is None:
        return derived
    if requested > derived:
        raise ValueError(f"max_model_len ({requested}) is larger than the model's context length ({derived}); "
                         "leave it unset or lower it")
    return requested
