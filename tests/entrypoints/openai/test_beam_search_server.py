"""``use_beam_search`` on ``/v1/completions`` and ``/v1/chat/completions`` with the real ``openai`` client
against a live server: the choices are ``pagoda.LLM.beam_search``'s beams, best first."""

from __future__ import annotations

import openai
import pytest

from pagoda.entrypoints.chat_utils import apply_chat_template
from pagoda.sampling_params import BeamSearchParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def reference_beams(llm, prompt, **kwargs):
    return llm.beam_search([prompt], BeamSearchParams(**kwargs))[0].sequences


def generated_text(llm, sequence, prompt_len: int) -> str:
    """What the server answers for a beam: its generated text, without an ending EOS."""
    tokens = sequence.tokens[prompt_len:]
    if sequence.finish_reason == "stop":
        tokens = tokens[:-1]
    return llm.get_tokenizer().decode(tokens, skip_special_tokens=True)


def test_completions_beams_match_llm_beam_search(client, reference_llm, tiny_chat_model_dir):
    expected = reference_beams(reference_llm, PROMPT, beam_width=3, max_tokens=8, length_penalty=0.5)
    response = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPT, n=3, max_tokens=8,
                                         extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.index for c in response.choices] == [0, 1, 2]
    prompt_len = len(reference_llm.get_tokenizer().encode(PROMPT))
    assert [c.text for c in response.choices] == [generated_text(reference_llm, s, prompt_len) for s in expected]
    assert [c.finish_reason for c in response.choices] == [seq.finish_reason for seq in expected]
    assert all(seq.text == reference_llm.get_tokenizer().decode(seq.tokens) for seq in expected)  # vLLM's text
    assert response.usage.prompt_tokens == prompt_len
    assert response.usage.completion_tokens == sum(len(seq.tokens) - prompt_len for seq in expected)
    assert len({c.text for c in response.choices}) == 3  # three different beams


def test_chat_beams_match_llm_beam_search(client, reference_llm, tiny_chat_model_dir):
    tokenizer = reference_llm.get_tokenizer()
    text = apply_chat_template(tokenizer, MESSAGES, None, True, False, {})
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = reference_beams(reference_llm, {"prompt_token_ids": ids}, beam_width=2, max_tokens=6)
    response = client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES, n=2, max_tokens=6,
                                              extra_body={"use_beam_search": True})
    assert [c.message.content for c in response.choices] == [generated_text(reference_llm, s, len(ids))
                                                              for s in expected]


def test_stream_returns_the_final_beams(client, tiny_chat_model_dir):
    full = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPT, n=2, max_tokens=5,
                                     extra_body={"use_beam_search": True})
    chunks = list(client.completions.create(model=tiny_chat_model_dir, prompt=PROMPT, n=2, max_tokens=5,
                                            stream=True, extra_body={"use_beam_search": True}))
    texts = {c.choices[0].index: c.choices[0].text for c in chunks}
    assert [texts[i] for i in range(2)] == [c.text for c in full.choices]
    assert all(c.choices[0].finish_reason is not None for c in chunks)  # each beam comes whole, once


@pytest.mark.parametrize("extra,field", [
    ({"top_p": 0.5}, "top_p"), ({"stop": ["x"]}, "stop"), ({"logprobs": 2}, "logprobs"),
    ({"length_penalty": "long"}, "length_penalty"), ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"guided_json": {"type": "object"}}, "guided_json"), ({"best_of": 3}, "best_of"),
])
def test_conflicting_fields_are_400s(client, tiny_chat_model_dir, extra, field):
    body = {"use_beam_search": True, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=tiny_chat_model_dir, prompt=PROMPT, n=2, max_tokens=4, extra_body=body)
    assert field in str(info.value)
    # the server keeps serving
    ok = client.completions.create(model=tiny_chat_model_dir, prompt=PROMPT, n=2, max_tokens=4,
                                   extra_body={"use_beam_search": True})
    assert len(ok.choices) == 2
