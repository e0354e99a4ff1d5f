"""``SpeculativeConfig``: vLLM's ``--speculative-config`` JSON, checked key by key.

Two methods are supported: ``ngram`` (prompt lookup: the tokens that followed the latest n-gram's earlier
occurrence in the prompt or output) and ``draft_model`` (a smaller model sharing the target's tokenizer). As in
vLLM, a config naming a ``model`` without a ``method`` means ``draft_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
#: vLLM's default n-gram window when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """Validate a ``speculative_config`` dict; every error names the key and the allowed values."""
        if raw is None or isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config: must be a JSON object / dict with keys {', '.join(KEYS)}, got "
                             f"{type(raw).__name__}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; supported keys: "
                             f"{', '.join(KEYS)}")
        model = raw.get("model")
        method = raw.get("method")
        if method is None:
            if model is None:
                raise ValueError("speculative_config.method: missing; one of " + ", ".join(METHODS)
                                 + " (or give 'model' for a draft model)")
            method = "ngram" if model in ("ngram", "[ngram]") else "draft_model"  # vLLM's legacy spelling
        if method not in METHODS:
            raise ValueError(f"speculative_config.method: {method!r} is not supported; supported methods: "
                             f"{', '.join(METHODS)}")
        k = raw.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens: must be an integer >= 1, got {k!r}")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config.model: the draft_model method needs the draft model's path or "
                                 "hub id")
            for key in ("prompt_lookup_max", "prompt_lookup_min"):
                if raw.get(key) is not None:
                    raise ValueError(f"speculative_config.{key}: only applies to method 'ngram', not 'draft_model'")
            return cls("draft_model", k, model=model)
        if model not in (None, "ngram", "[ngram]"):
            raise ValueError(f"speculative_config.model: method 'ngram' takes no model, got {model!r}")
        lookup_max, lookup_min = raw.get("prompt_lookup_max"), raw.get("prompt_lookup_min")
        for key, value in (("prompt_lookup_max", lookup_max), ("prompt_lookup_min", lookup_min)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config.{key}: must be an integer >= 1, got {value!r}")
        # vLLM: one bound given means both; neither means the default window.
        if lookup_max is None and lookup_min is None:
            lookup_max = lookup_min = DEFAULT_PROMPT_LOOKUP
        elif lookup_max is None:
            lookup_max = lookup_min
        elif lookup_min is None:
            lookup_min = lookup_max
        if lookup_min > lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {lookup_min} is larger than prompt_lookup_max "
                             f"({lookup_max})")
        return cls("ngram", k, prompt_lookup_max=lookup_max, prompt_lookup_min=lookup_min)

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots a request needs past its scheduled tokens: the draft model writes its k proposals' KV beyond
        the tokens the target verified (n-gram proposals write nothing)."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0


def draft_engine_config(args: Any, target: Any) -> Any:
    """The draft model's ``EngineConfig``: the target's device, dtype, block size, context length and kernel
    choices, with the draft's own checkpoint (its own heads and layers, so its own attention set-up). The draft
    must share the target's vocabulary: its proposals are target token ids."""
    import dataclasses

    from pagoda.core.config import EngineConfig

    spec = target.speculative_config
    dtype = str(target.model.dtype).removeprefix("torch.")
    fields = {f.name for f in dataclasses.fields(args)}
    kept = {name: getattr(args, name) for name in ("device", "attention_backend", "op_impl", "block_size",
                                                   "trust_remote_code", "download_dir", "enforce_eager",
                                                   "seed") if name in fields}
    draft_args = type(args)(model=spec.model, dtype=dtype, max_model_len=target.model.max_model_len,
                            load_format="dummy" if args.load_format == "dummy" else "auto",
                            skip_tokenizer_init=True, disable_log_stats=True, **kept)
    try:
        draft = EngineConfig.from_engine_args(draft_args, target.registry)
    except ValueError as e:
        raise ValueError(f"speculative_config.model: the draft model {spec.model!r} can't serve as a draft for "
                         f"this target: {e}") from e
    if draft.model.task != "generate" or draft.model.is_encoder_only:
        raise ValueError(f"speculative_config.model: the draft model {spec.model!r} is not a generative decoder")
    if draft.model.vocab_size != target.model.vocab_size:
        raise ValueError(f"speculative_config.model: the draft model's vocabulary ({draft.model.vocab_size} tokens) "
                         f"differs from the target's ({target.model.vocab_size}); the draft must share the "
                         "target's tokenizer")
    return draft
