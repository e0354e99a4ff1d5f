"""Authentication, error statuses and bodies, limits, and the OpenAPI schema of a live server."""

from __future__ import annotations

import re

import openai
import pytest
import requests

from pagoda.version import __version__

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def post(server, path, body, headers=AUTH, **kwargs):
    return requests.post(server.url + path, json=body, headers=headers, timeout=30, **kwargs)


def assert_error(response, status, param=None, contains=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert contains in error["message"], error["message"]
    return error


def test_auth_required_on_v1_only(tiny_server):
    assert_error(requests.get(tiny_server.url + "/v1/models", timeout=10), 401, contains="missing API key")
    wrong = requests.get(tiny_server.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert_error(wrong, 401, contains="invalid API key")
    assert_error(post(tiny_server, "/v1/completions", {"prompt": "x"}, headers={}), 401)
    assert requests.get(tiny_server.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    for open_path in ("/health", "/ping", "/metrics", "/version"):
        assert requests.get(tiny_server.url + open_path, timeout=10).status_code == 200
    bad_client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


COMPLETION_CASES = [
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", ""),
    ({"prompt": "x", "n": 0}, 400, "n", ""),
    ({"prompt": "x", "n": 129}, 400, "n", "128"),
    ({"prompt": "x", "best_of": 500}, 400, "best_of", ""),
    ({"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", "best_of"),
    ({"prompt": "x", "n": 1, "best_of": 2, "stream": True}, 400, "best_of", "stream"),
    ({"prompt": "x", "n": 2, "temperature": 0}, 400, None, "greedy"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
    ({"prompt": []}, 400, "prompt", "non-empty"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "non-empty"),
    ({"prompt": [5, 10**9]}, 400, "prompt", "out of range"),
    ({"prompt": {"text": "x"}}, 400, "prompt", ""),
    ({"prompt": "x", "max_tokens": 1024}, 400, "prompt", "maximum context length is 1024"),
    ({"prompt": "word " * 1100}, 400, "prompt", "1024"),
    ({"prompt": "x", "logprobs": 50}, 400, None, "max_logprobs"),
    ({"prompt": "x", "stop_token_ids": [-3]}, 400, "stop_token_ids", "out of range"),
    ({"prompt": "x", "logit_bias": {"abc": 1.0}}, 400, "logit_bias", "token ids"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed", ""),
    ({"prompt": "x", "stop": [""]}, 400, None, "non-empty"),
    ({"prompt": "x", "top_p": 1e-300}, 400, "top_p", "32-bit"),  # 0 in float32: nothing would be kept
    ({"prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty", "32-bit"),
    ({"prompt": "x", "logit_bias": {"5": 1e300}}, 400, "logit_bias", "32-bit"),
    ({"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, 400, "stream_options.bogus", ""),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream=true"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model", "does not exist"),
    # no coercion: a value of the wrong JSON type is refused, as OpenAI's API does
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "x", "echo": 1}, 400, "echo", "valid boolean"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": 5.0}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": "0.5"}, 400, "temperature", "valid number"),
    ({"prompt": "x", "stop": 5}, 400, "stop", ""),
    ({"prompt": [1, True]}, 400, "prompt", ""),
    ({"prompt": "x", "cache_salt": ""}, 400, "cache_salt", "at least 1"),
    ({"prompt": "x", "cache_salt": 7}, 400, "cache_salt", "valid string"),
]


# Python's JSON parser accepts these literals; none may reach the sampler
NON_FINITE = ['{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "logit_bias": {"5": Infinity}}',
              '{"prompt": "x", "repetition_penalty": Infinity}', '{"prompt": "x", "top_p": NaN}']


@pytest.mark.parametrize("raw", NON_FINITE)
def test_non_finite_numbers_are_refused(tiny_server, raw):
    response = requests.post(tiny_server.url + "/v1/completions", data=raw, timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400, contains="finite")
    assert requests.get(tiny_server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("body,status,param,contains", COMPLETION_CASES,
                         ids=[str(i) for i in range(len(COMPLETION_CASES))])
def test_bad_completion_requests(tiny_server, body, status, param, contains):
    assert_error(post(tiny_server, "/v1/completions", body), status, param, contains)


CHAT_CASES = [
    ({"messages": []}, 400, "messages", ""),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content", ""),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice",
     "--enable-auto-tool-choice"),
    ({"messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format", "json_schema"),
    ({"messages": CHAT, "max_completion_tokens": 5000}, 400, "messages", "maximum context length"),
    ({"messages": CHAT, "continue_final_message": True}, 400, "messages", "continue_final_message"),
    ({"messages": CHAT, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ({"messages": CHAT, "chat_template": "{{ messages }}"}, 400, "chat_template", "--trust-request-chat-template"),
    ({"messages": CHAT, "logprobs": "true"}, 400, "logprobs", "valid boolean"),
    ({"messages": CHAT, "n": "2"}, 400, "n", "valid integer"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", ""),
    ({"messages": CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage", "valid boolean"),
]


@pytest.mark.parametrize("body,status,param,contains", CHAT_CASES, ids=[str(i) for i in range(len(CHAT_CASES))])
def test_bad_chat_requests(tiny_server, body, status, param, contains):
    assert_error(post(tiny_server, "/v1/chat/completions", body), status, param, contains)


def test_malformed_json_and_unknown_route(tiny_server):
    response = requests.post(tiny_server.url + "/v1/completions", data=b"{not json", timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400)
    assert_error(requests.get(tiny_server.url + "/v1/nothing-here", headers=AUTH, timeout=10), 404)


def test_body_size_limit(tiny_server):
    big = {"prompt": "x" * 1_100_000}  # the test server's limit is 1,000,000 bytes
    assert_error(post(tiny_server, "/v1/completions", big), 413, contains="1000000")

    def chunks():  # no Content-Length: the limit is enforced while the body arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 100_000
        yield b'"}'
    response = requests.post(tiny_server.url + "/v1/completions", data=chunks(), timeout=30,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 413)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=None, prompt="x", max_tokens=-5)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="unknown", messages=CHAT)


def test_server_still_serves_after_bad_input(client, tiny_server, tiny_chat_model_dir):
    response = client.completions.create(model=tiny_chat_model_dir, prompt="still fine", max_tokens=3,
                                         temperature=0)
    assert response.usage.completion_tokens == 3
    errors = re.findall(r"^(?:ERROR|CRITICAL)\b.*$", tiny_server.output(), re.M)
    assert not errors, errors[:5]  # a bad request is the client's business, not the operator's


def test_version_and_openapi(tiny_server):
    assert requests.get(tiny_server.url + "/version", timeout=10).json() == {"version": __version__}
    schema = requests.get(tiny_server.url + "/openapi.json", timeout=10).json()
    paths = schema["paths"]
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/health",
                 "/metrics", "/version"):
        assert path in paths, path
    completion = paths["/v1/completions"]["post"]
    assert completion["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest")
    assert set(completion["responses"]) >= {"200", "400", "401", "404", "413", "500"}
    assert "text/event-stream" in completion["responses"]["200"]["content"]
    assert completion["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("prompt", "max_tokens", "best_of", "logprobs", "echo", "top_k", "min_p", "repetition_penalty",
                 "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output"):
        assert name in fields, name
    assert "422" not in completion["responses"]
    chat_fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs",
                 "add_generation_prompt", "continue_final_message"):
        assert name in chat_fields, name
