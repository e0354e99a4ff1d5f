"""Sampling parameters of a request, with vLLM's field names, defaults and meaning.

A :class:`SamplingParams` is built by the user (``SamplingParams(temperature=0.8, top_p=0.95)``) or from an
OpenAI request, validated on construction, and then read by the sampler (logits side) and the detokenizer
(stop checking side). Differences from vLLM are noted on the fields they concern.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, fields
from typing import Any

from pagoda.logger import init_logger

logger = init_logger(__name__)

#: Temperatures below this are greedy sampling (argmax).
SAMPLING_EPS = 1e-5
#: Non-zero temperatures below this are raised to it: dividing logits by a tinier value overflows to inf/NaN.
MIN_RANDOM_TEMPERATURE = 1e-2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    #: Every output carries the whole text and all token ids produced so far.
    CUMULATIVE = 0
    #: Every output carries only what is new since the previous one (streaming).
    DELTA = 1
    #: Only the final output is returned.
    FINAL_ONLY = 2


#: generation_config.json keys that change sampling defaults, and the SamplingParams field each one sets.
_GENERATION_CONFIG_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a JSON schema,
    as a dict or its JSON text), ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (EBNF /
    GBNF), ``json_object`` (any JSON object) or ``structural_tag`` must be set."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        kinds = [name for name in _CONSTRAINT_KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("structured outputs: exactly one of " + ", ".join(_CONSTRAINT_KINDS)
                             + f" must be set, got {kinds or 'none'}.")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured outputs: choice must be a non-empty list of strings.")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """The constraint's kind: ``json``, ``regex``, ``choice``, ``grammar``, ``json_object`` or
        ``structural_tag``."""
        return next(name for name in _CONSTRAINT_KINDS if getattr(self, name) not in (None, False))


_CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
#: The name older vLLM releases gave the same class.
GuidedDecodingParams = StructuredOutputsParams


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    Token-level fields (``temperature`` … ``allowed_token_ids``) are applied by the sampler to the logits,
    in vLLM's order; text-level fields (``stop``, ``detokenize``, ``skip_special_tokens`` …) by the
    detokenizer. ``top_k`` 0 and -1 both mean "off". ``logprobs``/``prompt_logprobs`` -1 mean the whole
    vocabulary. ``max_tokens=None`` means "up to the model's context length".

    Greedy sampling (``temperature`` < 1e-5) requires ``n == 1`` (and ``best_of`` 1 or unset), as in
    vLLM: the ``n`` completions would all be the same. Zero temperature also resets ``top_p``, ``top_k`` and
    ``min_p`` to their neutral values, since they cannot change an argmax.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    #: Constrain the output to a JSON schema, regex, choice or grammar (see :class:`StructuredOutputsParams`).
    structured_outputs: StructuredOutputsParams | None = None
    #: vLLM's earlier name of ``structured_outputs``; given, it moves there.
    guided_decoding: StructuredOutputsParams | None = field(default=None, repr=False)
    # Stop tokens including the model's EOS ids, filled by update_from_generation_config; min_tokens masks them.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        # Normalise the accepted spellings before validating, so the checks see one form.
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("guided_decoding is the older name of structured_outputs; give only one of them.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.bad_words = [] if self.bad_words is None else list(self.bad_words)
        if self.logit_bias is not None:
            self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.output_kind = RequestOutputKind(self.output_kind)
        if 0 < self.temperature < MIN_RANDOM_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s, which risks inf/NaN; using %s instead.",
                self.temperature, MIN_RANDOM_TEMPERATURE, MIN_RANDOM_TEMPERATURE,
            )
            self.temperature = MIN_RANDOM_TEMPERATURE
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # An argmax does not depend on these; resetting them keeps the sampler's fast path.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            self._verify_greedy_sampling()
        self.all_stop_token_ids = set(self.all_stop_token_ids) | set(self.stop_token_ids)

    # ----------------------------------------------------------------------------------------------- checks
    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}.")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise ValueError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or an integer >= 1, got {self.top_k!r}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}.")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < -1):
                raise ValueError(f"{name} must be None, -1 (whole vocabulary) or an integer >= 0, got {value!r}.")
        if self.truncate_prompt_tokens is not None and (
            not isinstance(self.truncate_prompt_tokens, int)
            or (self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1)
        ):
            raise ValueError(
                f"truncate_prompt_tokens must be None, -1 (the model's limit) or an integer >= 1, "
                f"got {self.truncate_prompt_tokens!r}."
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must contain only non-empty strings, got {self.stop!r}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True; use stop_token_ids to stop without text.")
        if any(not _is_int(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {self.stop_token_ids!r}.")
        if any(not isinstance(w, str) or not w for w in self.bad_words):
            raise ValueError(f"bad_words must contain only non-empty strings, got {self.bad_words!r}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be None or a non-empty list of token ids, got [].")
            if any(not _is_int(t) for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must contain only integers, got {self.allowed_token_ids!r}.")

    def _verify_greedy_sampling(self) -> None:
        if self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling (temperature=0), got {self.n}.")
        if self.best_of is not None and self.best_of > 1:
            raise ValueError(f"best_of must be 1 when using greedy sampling (temperature=0), got {self.best_of}.")

    def verify_token_ids(self, vocab_size: int) -> None:
        """Check the token ids the request names against the model's vocabulary (the engine calls this)."""
        for name, ids in (
            ("logit_bias", list(self.logit_bias or ())),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:10]}.")

    # ------------------------------------------------------------------------------------------ properties
    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def max_stop_str_len(self) -> int:
        """Length of the longest stop string (0 when there is none)."""
        return max((len(s) for s in self.stop), default=0)

    def clone(self) -> SamplingParams:
        """A deep copy, so that per-request changes (e.g. generation-config defaults) never leak back."""
        return copy.deepcopy(self)

    # ---------------------------------------------------------------------------------- generation config
    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Take the model's EOS ids into stop handling, like vLLM.

        ``model_eos_token_id`` (the tokenizer's EOS) joins :attr:`all_stop_token_ids`, so ``min_tokens``
        suppresses it. Extra EOS ids listed in ``generation_config["eos_token_id"]`` (an int or a list)
        also become ``stop_token_ids`` unless ``ignore_eos`` is set, so a model with several end tokens
        (e.g. ``<|eot_id|>`` and ``<|end_of_text|>``) stops at any of them.
        """
        if model_eos_token_id is not None:
            self.all_stop_token_ids.add(model_eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self.all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                self.stop_token_ids = list(dict.fromkeys([*self.stop_token_ids, *sorted(eos_ids)]))

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any] | None, **overrides: Any) -> SamplingParams:
        """Sampling defaults from a model's generation_config.json, overridden by the given fields.

        Like vLLM's ``get_default_sampling_params``: only ``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``) are taken from the file; a field
        passed here always wins. Pass only the fields the user set (e.g. the non-None fields of an API
        request).
        """
        kwargs = default_sampling_kwargs(generation_config or {})
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        # Only what differs from the defaults: a 27-field repr hides the interesting part.
        parts = []
        for f in fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            default = f.default
            if value == default or (default is None and value == []):
                continue
            if f.name == "output_kind":
                value = value.name
            parts.append(f"{f.name}={value!r}")
        return f"SamplingParams({', '.join(parts)})"


@dataclass
class BeamSearchParams:
    """Beam search, as vLLM's ``BeamSearchParams`` (``LLM.beam_search``, ``use_beam_search`` on the server).

    ``beam_width`` beams are kept at every step and ``beam_width`` sequences returned, best first. Scores follow
    transformers' ``generate(num_beams=..., do_sample=False)``: a finished sequence's score is its cumulative
    log-probability divided by ``generated_length ** length_penalty``; ``early_stopping`` (transformers' name and
    meaning: ``False``, ``True`` or ``"never"``) decides when the search stops — see ``docs/decoding.md``.
    Candidates are scored with the model's raw log-probabilities, as vLLM's are (its logprobs are taken before
    temperature), so ``temperature`` is accepted for compatibility and doesn't change the search, which is
    deterministic. ``include_stop_str_in_output`` keeps the EOS token's text at the end of a sequence that
    ended with it.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0.0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature!r}.")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")

    def clone(self) -> BeamSearchParams:
        return copy.deepcopy(self)


def default_sampling_kwargs(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams keyword arguments a generation_config.json asks for (the fields vLLM reads)."""
    return {
        param: generation_config[key]
        for key, param in _GENERATION_CONFIG_FIELDS.items()
        if generation_config.get(key) is not None
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_logit_bias(logit_bias: dict[Any, float]) -> dict[int, float]:
    # JSON objects have string keys, so "50256" is accepted; biases are clamped to [-100, 100] like vLLM/OpenAI.
    result = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}.") from None
        if isinstance(key, float) or isinstance(key, bool):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}.")
        try:
            bias = float(bias)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias values must be numbers, got {bias!r} for token {key!r}.") from None
        result[token_id] = min(100.0, max(-100.0, bias))
    return result
