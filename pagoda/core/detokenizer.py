"""Incremental detokenization and stop checking for one output sequence.

Detokenizing token by token with ``decode([token])`` breaks multi-byte characters split over byte tokens
and drops SentencePiece's word-boundary spaces; decoding the whole sequence every step costs O(length).
:class:`IncrementalDetokenizer` decodes a short window instead: ``prefix_offset`` marks the start of the
already-emitted tokens kept as context, ``read_offset`` the end of what has been emitted::

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 [  context, emitted   ][   new, not emitted  ]
    delta = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

While the decoded window ends in U+FFFD (an incomplete UTF-8 sequence) nothing is emitted; the window then
slides forward, so the cost per token stays constant. The window starts in the last prompt tokens, so the
first generated token gets the leading space it has in context (" Paris", as vLLM returns it).

When only the final text is wanted (``RequestOutputKind.FINAL_ONLY``) and there are no stop strings to look
for, a detokenizer can be *deferred*: it only collects ids, and the text is produced when it is read. With a
byte-level BPE decoder (GPT-2, Llama 3, Qwen, SmolLM) the window is then decoded in one call: its decoding is the
UTF-8 of the tokens' bytes joined, so when the decoded window holds no U+FFFD every token boundary where the
step-by-step decoding emits text is a character boundary, and the deltas it would have emitted join up to the
single call's text. When that check fails (invalid or incomplete UTF-8, byte-fallback tokens, joined added
tokens, other decoders) the ids are fed through the step-by-step path instead, so the text is the same either way.

Stopping follows vLLM v1: :func:`check_stop` decides on token ids (length first, then EOS, then
``stop_token_ids``) and the detokenizer then looks for stop strings in the text. The text of a stop token
is left out unless ``include_stop_str_in_output``; the final text otherwise equals
``tokenizer.decode(output_ids, skip_special_tokens=...)`` decoded in the prompt's context.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import decoders

from pagoda.outputs import Logprob
from pagoda.sampling_params import SamplingParams

#: Prompt tokens decoded as context before the first output token (enough for a split UTF-8 character).
_CONTEXT_TOKENS = 5
#: Emitted tokens kept in the id buffer before it is compacted.
_COMPACT_AFTER = 512


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS and length


def check_stop(
    params: SamplingParams,
    output_token_ids: list[int],
    eos_token_ids: set[int] | frozenset[int],
    *,
    num_prompt_tokens: int = 0,
    max_model_len: int | None = None,
) -> StopDecision | None:
    """Token-level stop check after a token was appended, in vLLM v1's order.

    1. ``max_tokens`` reached, or the context is full → "length" (even when that token is EOS);
    2. nothing else before ``min_tokens`` outputs;
    3. an EOS id (unless ``ignore_eos``) → "stop" with ``stop_reason`` None;
    4. one of ``stop_token_ids`` → "stop" with ``stop_reason`` the id.
    Stop strings are checked by :meth:`IncrementalDetokenizer.process` on the text.
    """
    num_output = len(output_token_ids)
    if (params.max_tokens is not None and num_output >= params.max_tokens) or (
        max_model_len is not None and num_prompt_tokens + num_output >= max_model_len
    ):
        return StopDecision("length")
    if num_output < params.min_tokens or num_output == 0:
        return None
    last = output_token_ids[-1]
    if not params.ignore_eos and last in eos_token_ids:
        return StopDecision("stop")
    if last in params.stop_token_ids:
        return StopDecision("stop", last)
    return None


def stop_bounds(params: SamplingParams, eos_token_ids: set[int] | frozenset[int], *, num_prompt_tokens: int = 0,
                max_model_len: int | None = None) -> tuple[float, frozenset[int]]:
    """What :func:`check_stop` (same arguments) can stop on: from how many output tokens on (a length), and on which
    last tokens. Below the length and off those tokens it returns None, so callers skip it there."""
    limit = float("inf") if params.max_tokens is None else params.max_tokens
    if max_model_len is not None:
        limit = min(limit, max_model_len - num_prompt_tokens)
    stops = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        stops |= set(eos_token_ids)
    return limit, frozenset(stops)


def find_stop_string(text: str, new_char_count: int, stops: list[str],
                     include_in_output: bool) -> tuple[str, int] | None:
    """The earliest stop string that ends in the last ``new_char_count`` characters of ``text``.

    Returns ``(stop_string, truncate_to)``: the text must be cut to ``text[:truncate_to]`` (before the stop
    string, or after it with ``include_in_output``). Only the new tail plus ``len(stop) - 1`` characters
    before it is searched, since older text was searched on earlier calls.
    """
    if new_char_count <= 0 or not stops:
        return None
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_char_count - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    return stop, (index + len(stop) if include_in_output else index)


class IncrementalDetokenizer:
    """Text of one output sequence, grown token by token; see the module docstring.

    ``output_text`` is the text so far (stop strings already cut); ``token_ids`` all output ids.
    With ``params.detokenize`` False (or no tokenizer) only the ids are kept.

    ``defer``: the text is only read once the sequence has finished (see the module docstring); ignored when
    ``params`` has stop strings, which need the text of every step. A deferred detokenizer's ``output_text``
    is only up to date after :meth:`flush` or :meth:`get_next_output_text`.
    """

    def __init__(self, tokenizer: Any | None, prompt_token_ids: list[int], params: SamplingParams,
                 defer: bool = False) -> None:
        self.params = params
        self.token_ids: list[int] = []
        self.output_text = ""
        self.enabled = tokenizer is not None and params.detokenize
        self._stop_buffer_length = (
            params.max_stop_str_len - 1 if params.stop and not params.include_stop_str_in_output else 0
        )
        self._last_output_offset = 0
        self._deferred = False
        if not self.enabled:
            return
        self.skip_special_tokens = params.skip_special_tokens
        info = _tokenizer_info(tokenizer)
        self._decode_fn = info.decode
        self._special_ids = info.special_ids
        self._added_tokens = info.added_tokens
        self._byte_ids = info.byte_fallback_ids
        # Without spaces between special tokens, a decoder that separates added tokens is overridden below.
        self._join_added_tokens = not params.spaces_between_special_tokens and not params.skip_special_tokens
        self._last_was_added = False
        context = [t for t in prompt_token_ids if not self._skipped(t)][-_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        self._stop_check_offset = 0
        self._deferred = defer and not params.stop
        self._pending: list[int] = []  # deferred ids not decoded yet (skipped special ids already left out)
        self._byte_level = info.byte_level
        self._one_call_decode = info.byte_level and not self._join_added_tokens

    # ------------------------------------------------------------------------------------ detokenizing
    def _skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self._special_ids

    def _decode(self, ids: list[int]) -> str:
        # Skipped special ids never enter the buffer, so the decoder needs no skipping of its own; dropping
        # them first is what `decode(..., skip_special_tokens=True)` does before running the decoder.
        return self._decode_fn(ids, skip_special_tokens=False) if ids else ""

    def _decode_next(self, token_id: int) -> str:
        if self.skip_special_tokens and token_id in self._special_ids:
            return ""
        ids = self._ids
        ids.append(token_id)
        if token_id in self._byte_ids:
            # SentencePiece byte fallback decodes a run of byte tokens as a whole (all of it U+FFFD if any
            # part is invalid), so nothing is emitted while the run may still grow.
            return ""
        prefix_text = self._prefix_text
        new_text = self._decode_fn(ids[self._prefix_offset :], skip_special_tokens=False)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # Nothing new yet, or a character still incomplete: keep the tokens pending.
            return ""
        delta = raw = new_text[len(prefix_text) :]
        if self._join_added_tokens:
            is_added = token_id in self._added_tokens
            if is_added and self._last_was_added:
                delta = self._added_tokens[token_id]
            self._last_was_added = is_added
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        if self._byte_level and "\ufffd" not in new_text:
            # Valid UTF-8 of joined token bytes: the new window's text is what the old window's text gained.
            self._prefix_text = raw
        else:
            self._prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        if self._prefix_offset > _COMPACT_AFTER:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str:
        """Append output tokens and return the text they add (possibly "" while a character is incomplete).

        ``stop_terminated``: the last token is the EOS/stop token that ended the sequence; its text is left
        out unless ``include_stop_str_in_output``.
        """
        num_before = len(self.token_ids)
        self.token_ids.extend(new_token_ids)
        if not self.enabled:
            return ""
        if stop_terminated and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        if self._deferred:
            if self.skip_special_tokens:
                special = self._special_ids
                for t in new_token_ids:  # usually one token: a loop is cheaper than a generator here
                    if t not in special:
                        self._pending.append(t)
            else:
                self._pending.extend(new_token_ids)
            return ""
        start = len(self.output_text)
        for offset, token_id in enumerate(new_token_ids):
            self.output_text += self._decode_next(token_id)
            # Text produced within min_tokens may not end the sequence (vLLM does the same).
            if num_before + offset + 1 <= self.params.min_tokens:
                self._stop_check_offset = len(self.output_text)
        return self.output_text[start:]

    def _catch_up(self) -> None:
        """Decode a deferred detokenizer's pending ids (in one call where that gives the same text) and stop
        deferring: ids appended later are decoded step by step."""
        pending, self._pending = self._pending, []
        self._deferred = False
        if not pending:
            return
        if self._one_call_decode and self._byte_ids.isdisjoint(pending):
            window = self._ids[self._prefix_offset :]
            window.extend(pending)
            text = self._decode(window)
            if "\ufffd" not in text and len(text) >= len(self._prefix_text):
                # Valid UTF-8 throughout: the step-by-step deltas would join up to exactly this.
                delta = text[len(self._prefix_text) :]
                self._ids.extend(pending)
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._prefix_text = delta
                self.output_text += delta
                return
        for token_id in pending:
            self.output_text += self._decode_next(token_id)

    def flush(self) -> str:
        """Emit tokens held back as an incomplete character (at the end of the sequence), as U+FFFD like
        ``decode`` does."""
        if self._deferred:
            self._catch_up()
        if not self.enabled or self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset :])
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self.output_text += delta
        return delta

    # ------------------------------------------------------------------------------------ stop checking
    def process(self, new_token_ids: list[int], token_stop: StopDecision | None) -> StopDecision | None:
        """One step of output processing: decode the new tokens, look for stop strings, finish the text.

        ``token_stop`` is :func:`check_stop`'s decision for these tokens. A stop string found in the new
        text ends the sequence (even one that also hit its length limit) and cuts the text there.
        """
        if token_stop is None and self._deferred:  # only collect the ids (update's deferred branch, inlined)
            self.token_ids.extend(new_token_ids)
            if self.skip_special_tokens:
                special, pending = self._special_ids, self._pending
                for t in new_token_ids:  # usually one token: a loop is cheaper than a generator here
                    if t not in special:
                        pending.append(t)
            else:
                self._pending.extend(new_token_ids)
            return None
        stop_terminated = token_stop is not None and token_stop.finish_reason == "stop"
        self.update(new_token_ids, stop_terminated)
        if token_stop is not None:
            self.flush()
        decision = token_stop
        params = self.params
        if self.enabled and params.stop and len(self.token_ids) > params.min_tokens:
            found = find_stop_string(
                self.output_text, len(self.output_text) - self._stop_check_offset, params.stop,
                params.include_stop_str_in_output,
            )
            if found is not None:
                stop, truncate_to = found
                self.output_text = self.output_text[:truncate_to]
                decision = StopDecision("stop", stop)
        self._stop_check_offset = len(self.output_text)
        return decision

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to return now: everything (``delta=False``) or what is new since the last call.

        Until the sequence finishes, the last ``len(longest stop string) - 1`` characters are held back,
        since they could be the start of a stop string that would be cut from the output.
        """
        if self._deferred:
            self._catch_up()
        hold = 0 if finished else self._stop_buffer_length
        end = max(0, len(self.output_text) - hold)
        if not delta:
            return self.output_text[:end]
        if end <= self._last_output_offset:
            return ""
        text = self.output_text[self._last_output_offset : end]
        self._last_output_offset = end
        return text


@dataclass(frozen=True)
class _TokenizerInfo:
    decode: Callable[..., str]
    special_ids: frozenset[int]
    added_tokens: dict[int, str]
    byte_fallback_ids: frozenset[int]
    byte_level: bool  # the decoder is byte-level BPE's: text = UTF-8 of the tokens' bytes joined


_TOKENIZER_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_info(tokenizer: Any) -> _TokenizerInfo:
    """What the detokenizer needs from a tokenizer, computed once per tokenizer object."""
    info = _TOKENIZER_INFO.get(tokenizer)
    if info is not None:
        return info
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: the same result as the HF wrapper's decode, several times faster.
        added = backend.get_added_tokens_decoder()
        info = _TokenizerInfo(
            decode=backend.decode,
            special_ids=frozenset(i for i, t in added.items() if t.special),
            added_tokens={i: t.content for i, t in added.items()},
            byte_fallback_ids=frozenset(
                i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None
            ),
            byte_level=isinstance(backend.decoder, decoders.ByteLevel),
        )
    else:
        def decode(ids: list[int], skip_special_tokens: bool) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

        info = _TokenizerInfo(
            decode=decode,
            special_ids=frozenset(tokenizer.all_special_ids),
            added_tokens={i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()},
            byte_fallback_ids=frozenset(),
            byte_level=False,
        )
    try:
        _TOKENIZER_INFO[tokenizer] = info
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return info


def position_logprobs(
    token_ids: list[int], logprobs: list[float], rank: int, num_logprobs: int, tokenizer: Any | None
) -> dict[int, Logprob]:
    """One position's ``{token_id: Logprob}`` from a row of :class:`~pagoda.core.sampler.LogprobsTensors`:
    the chosen token (column 0, with its ``rank``) and the first ``num_logprobs`` top tokens (ranks 1..k).
    ``num_logprobs`` -1 means every column. Token texts are decoded one by one, like vLLM."""
    count = len(token_ids) - 1 if num_logprobs == -1 else num_logprobs
    result: dict[int, Logprob] = {}
    for column in range(count + 1):
        token_id = token_ids[column]
        if token_id in result:
            continue
        text = tokenizer.decode([token_id]) if tokenizer is not None else None
        result[token_id] = Logprob(logprobs[column], rank if column == 0 else column, text)
    return result


def prompt_logprobs_list(
    rows: list[tuple[list[int], list[float], int]], num_logprobs: int, tokenizer: Any | None
) -> list[dict[int, Logprob] | None]:
    """A request's ``prompt_logprobs`` from the rows of
    :func:`~pagoda.core.sampler.compute_prompt_logprobs` (row ``i`` scores prompt token ``i + 1``): ``None``
    for the first prompt token, which nothing predicts, then one dict per following token."""
    return [None] + [position_logprobs(ids, values, rank, num_logprobs, tokenizer) for ids, values, rank in rows]
