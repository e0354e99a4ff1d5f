"""``EngineArgs``: every engine setting, with vLLM's names and defaults, and its command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pagoda.distributed.config import EXECUTOR_BACKENDS

TASKS = ("auto", "generate", "embed", "classify", "score", "reward")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
# Where the engine runs (vLLM's UsageContext): some defaults differ between offline use and a server. Set by the
# entry point, not a command-line flag.
USAGE_CONTEXTS = ("llm_class", "openai_api_server")
GENERATION_CONFIG_HELP = '"auto" reads the model\'s generation_config.json, "vllm" ignores it, or a folder path'


@dataclass
class EngineArgs:
    """Arguments of :class:`pagoda.LLM` and of the ``pagoda`` commands (``--flag-name`` on the command line)."""

    model: str | None = None  # None: the bundled default model
    task: str = "auto"
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    download_dir: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_logprobs: int = 20
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    swap_space: float = 4
    cpu_offload_gb: float = 0
    device: str = "auto"
    attention_backend: str | None = None
    op_impl: str | None = None
    quantization: str | None = None
    enforce_eager: bool = False
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    served_model_name: str | list[str] | None = None
    disable_sliding_window: bool = False
    disable_log_stats: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enable_expert_parallel: bool = False
    override_pooler_config: dict[str, Any] | None = None
    structured_outputs_config: dict[str, Any] | None = None
    guided_decoding_backend: str | None = None
    speculative_config: dict[str, Any] | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    usage_context: str = "llm_class"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming any bad or contradictory argument."""
        def bad(name: str, message: str) -> None:
            raise ValueError(f"{name}: {message}")

        if self.op_impl is not None:
            from pagoda.ops import parse_op_impl

            parse_op_impl(self.op_impl)  # malformed entries are an error naming the field
        from pagoda.core.structured_output.config import StructuredOutputsConfig

        StructuredOutputsConfig.from_args(self.structured_outputs_config, self.guided_decoding_backend)
        if self.speculative_config is not None:
            from pagoda.core.spec_decode.config import SpeculativeConfig

            SpeculativeConfig.from_dict(self.speculative_config)  # every key checked, errors name it
        from pagoda.lora.config import LoRAConfig

        LoRAConfig.from_engine_args(self)  # max_loras / max_lora_rank / max_cpu_loras checked
        if self.task not in TASKS:
            bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.usage_context not in USAGE_CONTEXTS:
            bad("usage_context", f"must be one of {', '.join(USAGE_CONTEXTS)}, got {self.usage_context!r}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            bad("load_format", f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.kv_cache_dtype != "auto":
            bad("kv_cache_dtype", f"only 'auto' (the model dtype) is supported, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block_size", f"must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            bad("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            bad("num_gpu_blocks_override", f"must be >= 1, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            bad("kv_cache_memory_bytes", f"must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.cpu_offload_gb < 0:
            bad("cpu_offload_gb", f"must be >= 0, got {self.cpu_offload_gb}")
        if self.max_logprobs < 0:
            bad("max_logprobs", f"must be >= 0, got {self.max_logprobs}")
        if self.generation_config not in ("auto", "vllm") and not self.generation_config:
            bad("generation_config", GENERATION_CONFIG_HELP)
        from pagoda.distributed.config import ParallelConfig

        ParallelConfig.from_engine_args(self)  # sizes and the executor backend checked
        if (not self.enable_chunked_prefill and self.max_num_batched_tokens is not None
                and self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                             f"({self.max_model_len}) with enable_chunked_prefill=False: a long prompt could never "
                             "be scheduled; raise max_num_batched_tokens or enable chunked prefill")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Like ``EngineArgs(**kwargs)`` but an unknown name is a ``ValueError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; valid arguments: "
                             f"{', '.join(sorted(names))}")
        return cls(**kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> argparse.ArgumentParser:
        """Add every engine flag to ``parser`` (as vLLM's ``EngineArgs.add_cli_args``)."""
        group = parser.add_argument_group("engine arguments")
        for f in dataclasses.fields(EngineArgs):
            if f.name == "usage_context" or (f.name == "model" and model_positional):
                continue
            flag = "--" + f.name.replace("_", "-")
            flags = (_SHORT_FLAGS[f.name], flag) if f.name in _SHORT_FLAGS else (flag,)
            help_text = _HELP.get(f.name, "")
            default = f.default if f.default is not dataclasses.MISSING else None
            annotation = str(f.type)
            if annotation == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            elif "dict" in annotation:
                group.add_argument(*flags, type=json.loads, default=default, help=help_text + " (JSON)")
            elif f.name == "served_model_name":
                group.add_argument(*flags, nargs="+", default=default, help=help_text)
            else:
                kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
                choices = {"task": TASKS, "dtype": DTYPES, "load_format": LOAD_FORMATS,
                           "distributed_executor_backend": EXECUTOR_BACKENDS}.get(f.name)
                group.add_argument(*flags, type=kind, default=default, choices=choices, help=help_text)
        return parser


_SHORT_FLAGS = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp", "data_parallel_size": "-dp"}

_HELP = {
    "model": "Hugging Face model directory or hub id, or a .gguf file (default: the bundled SmolLM2-135M-Instruct)",
    "task": "what the model is used for; auto decides from the architecture",
    "tokenizer": "tokenizer directory or hub id (default: the model's)",
    "tokenizer_mode": "auto (fast tokenizer when available) or slow",
    "skip_tokenizer_init": "do not load a tokenizer; prompts must be token ids",
    "trust_remote_code": "allow custom code from the model repository when loading configs and tokenizers",
    "download_dir": "hub cache directory",
    "load_format": "weight format; dummy gives random weights (benchmarks)",
    "dtype": "model dtype; auto takes the checkpoint's (bfloat16 for float32 checkpoints where supported)",
    "kv_cache_dtype": "KV-cache dtype (auto = model dtype)",
    "seed": "random seed of the engine",
    "max_model_len": "context length (default: the model's)",
    "block_size": "tokens per KV-cache block",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "enable_chunked_prefill": "split long prompts over several steps within the token budget",
    "max_num_seqs": "most sequences running at once",
    "max_num_batched_tokens": "token budget of one engine step (default 2048, at least max_model_len without chunked "
                              "prefill)",
    "max_logprobs": "largest logprobs / prompt_logprobs a request may ask for",
    "gpu_memory_utilization": "fraction of device memory for weights and KV cache (device platforms)",
    "kv_cache_memory_bytes": "KV-cache size in bytes (overrides gpu_memory_utilization and VLLM_CPU_KVCACHE_SPACE)",
    "num_gpu_blocks_override": "exact number of KV-cache blocks (testing)",
    "swap_space": "accepted for compatibility; preemption recomputes instead of swapping",
    "cpu_offload_gb": "GiB of weights kept in host memory and streamed to the device each forward pass",
    "device": "platform to run on (auto = the available one with the highest priority)",
    "attention_backend": "attention backend name (overrides VLLM_ATTENTION_BACKEND)",
    "op_impl": "op implementations to use, OP=IMPL[|IMPL...],... in priority order (overrides PAGODA_OP_IMPL op "
               "by op; `pagoda env` lists ops and implementations)",
    "quantization": "weight quantization method (default: from the checkpoint)",
    "enforce_eager": "never capture graphs or compile",
    "generation_config": GENERATION_CONFIG_HELP,
    "override_generation_config": "generation-config fields to override",
    "revision": "model revision on the hub",
    "tokenizer_revision": "tokenizer revision on the hub",
    "served_model_name": "model name(s) the server answers to",
    "disable_sliding_window": "attend to the full context even where the model uses a sliding window",
    "disable_log_stats": "do not log throughput statistics",
    "tensor_parallel_size": "ranks to split each layer across",
    "pipeline_parallel_size": "ranks to split the layers across, in consecutive stages",
    "data_parallel_size": "engine replicas serving requests side by side",
    "distributed_executor_backend": "how the ranks run: uni (one process), mp (worker processes on this machine), "
                                    "ray (Ray actors, several nodes) or external_launcher (torchrun-style SPMD); "
                                    "default: uni for one rank, else mp",
    "enable_expert_parallel": "MoE models: give each tensor-parallel rank whole experts instead of a slice of every "
                              "expert",
    "override_pooler_config": "pooling settings for embedding/classification models",
    "structured_outputs_config": 'structured outputs: {"backend": "xgrammar"|"auto", "disable_any_whitespace": '
                                 'bool, "disable_additional_properties": bool}',
    "guided_decoding_backend": "structured-output backend (older name of structured_outputs_config's backend): "
                               "xgrammar or auto",
    "speculative_config": 'speculative decoding, as vLLM: {"method": "ngram", "num_speculative_tokens": k, '
                          '"prompt_lookup_max": n, "prompt_lookup_min": m} or {"model": DRAFT, '
                          '"num_speculative_tokens": k}',
    "enable_lora": "serve LoRA adapters (LoRARequest / --lora-modules) beside the base model",
    "max_loras": "most distinct LoRA adapters in one engine step (adapter slots on the device)",
    "max_lora_rank": "largest LoRA rank an adapter may have (slots are padded to it)",
    "max_cpu_loras": "LoRA adapters kept in host memory (LRU; default: max_loras)",
    "usage_context": "llm_class or openai_api_server, set by the entry point (platform defaults may differ)",
}

assert set(_HELP) == {f.name for f in dataclasses.fields(EngineArgs)}, "every engine argument needs help text"
