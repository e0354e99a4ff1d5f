"""Structured outputs over HTTP with the real ``openai`` client: ``beta.chat.completions.parse`` with a pydantic
model, ``response_format`` json_object / json_schema, vLLM's ``guided_*`` and ``structured_outputs`` fields on
both endpoints, streaming, and 400s naming the field for bad constraints and unsupported backends."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.entrypoints.openai.conftest import API_KEY

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer",
                                                                                      "maximum": 30}},
          "required": ["kind", "age"]}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "parrot"]
    name: str = Field(max_length=6)
    legs: int = Field(ge=0, le=8)


def test_parse_with_a_pydantic_model(client, tiny_chat_model_dir):
    for seed in (0, 1):
        completion = client.beta.chat.completions.parse(
            model=tiny_chat_model_dir, messages=MESSAGES, response_format=Pet, temperature=1.0, seed=seed,
            max_tokens=80, extra_body={"guided_whitespace_pattern": " ?"})
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Pet), message.content
        jsonschema.validate(json.loads(message.content), Pet.model_json_schema())


def test_json_schema_and_json_object_response_formats(client, tiny_server, tiny_chat_model_dir):
    response = client.chat.completions.create(
        model=tiny_chat_model_dir, messages=MESSAGES, temperature=1.0, seed=3, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}},
        extra_body={"guided_whitespace_pattern": ""})
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
    # Any JSON object (a random model is favoured towards closing quotes and braces so that it ends in time).
    closers = [token for text in ('"', "}", '"}') for token in requests.post(
        tiny_server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()["tokens"]]
    response = client.chat.completions.create(
        model=tiny_chat_model_dir, messages=MESSAGES, temperature=1.0, seed=1, max_tokens=100,
        response_format={"type": "json_object"}, logit_bias={str(t): 8 for t in closers},
        extra_body={"guided_whitespace_pattern": ""})
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    assert response.choices[0].finish_reason == "stop"


def test_guided_fields_on_completions(client, tiny_chat_model_dir):
    choices = ["north", "south", "east or west"]
    completion = client.completions.create(model=tiny_chat_model_dir, prompt=["Go", "Head"], n=2, temperature=1.0,
                                           seed=4, max_tokens=10, extra_body={"guided_choice": choices})
    assert len(completion.choices) == 4 and all(c.text in choices for c in completion.choices)
    regex = r"[A-Z][a-z]{1,4} [0-9]{3}"
    completion = client.completions.create(model=tiny_chat_model_dir, prompt="Room:", temperature=1.0, seed=5,
                                           max_tokens=20, extra_body={"guided_regex": regex,
                                                                      "guided_decoding_backend": "xgrammar"})
    assert re.fullmatch(regex, completion.choices[0].text)
    grammar = 'root ::= "(" digit ("+" digit)? ")"\ndigit ::= [0-9]'
    completion = client.completions.create(model=tiny_chat_model_dir, prompt="Sum:", temperature=1.0, seed=6,
                                           max_tokens=20, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"\([0-9](\+[0-9])?\)", completion.choices[0].text)


def test_streaming_a_constrained_chat(client, tiny_chat_model_dir):
    kwargs = dict(model=tiny_chat_model_dir, messages=MESSAGES, temperature=1.0, seed=8, max_tokens=60,
                  extra_body={"guided_json": SCHEMA, "guided_whitespace_pattern": " "})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"guided_json": '{"type": "strin"}'}, "guided_json", 'Unsupported type "strin"'),
    ({"guided_regex": "a(b"}, "guided_regex", "invalid regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", 'Rule "missing" is not defined'),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend",
     "only the xgrammar backend"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
    ({"structured_outputs": {"regex": "a", "backend": "x"}}, "structured_outputs", "unknown field(s) backend"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                                         "contains": {}}}}},
     "response_format", "'contains'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "needs json_schema.schema"),
])
def test_bad_constraints_are_400s_naming_the_field(client, tiny_chat_model_dir, extra, param, message):
    for create in (lambda: client.chat.completions.create(model=tiny_chat_model_dir, messages=MESSAGES,
                                                          max_tokens=5, extra_body=extra),
                   lambda: client.completions.create(model=tiny_chat_model_dir, prompt="x", max_tokens=5,
                                                     extra_body=extra)):
        with pytest.raises(openai.BadRequestError) as info:
            create()
        error = info.value.body
        assert info.value.status_code == 400 and error["param"] == param, error
        assert message in error["message"], error
    # The server serves on.
    ok = client.completions.create(model=tiny_chat_model_dir, prompt="x", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"
