"""Tool calling through the real ``openai`` client against a live ``pagoda serve``.

The server runs a tiny model that has memorised its replies to a few tool conversations (``tool_model.py``), so
greedy decoding yields real model output in the Hermes format: the checks are that the server turns it into
OpenAI's ``tool_calls`` — whole and streamed — and back into the prompt for the next turn.
"""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import requests

from tests.entrypoints.openai.conftest import API_KEY, CACHE_DIR, TINY_ARGS, ServerProcess
from tests.entrypoints.openai.tool_model import (ANSWER, ASK, ASK_TWO, BOTH_INTRO, PARIS, RESULT, TOKYO, TOOLS,
                                                 WEATHER_PARAMETERS, build_tool_model, call_block,
                                                 history_after_call)
from tests.conftest import assert_all_blocks_free

# The tiny model, held to the required-calls array, keeps appending calls (the schema bounds no array length).
@pytest.fixture(scope="module")
def tool_model_dir() -> str:
    target = CACHE_DIR / "tiny-tool-caller-v1"
    if not (target / "model.safetensors").exists():
        build_tool_model(target)
    return str(target)


@pytest.fixture(scope="module")
def tool_server(tool_model_dir):
    server = ServerProcess([tool_model_dir, *TINY_ARGS, "--api-key", API_KEY, "--served-model-name", "tool-model",
                            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tool_client(tool_server):
    import openai

    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(client, messages, **kwargs):
    kwargs = {"tools": TOOLS, "temperature": 0, "max_completion_tokens": 100, **kwargs}
    return client.chat.completions.create(model="tool-model", messages=messages, **kwargs)


def calls_of(message) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]


def test_memorised_replies_through_llm_chat(tool_model_dir):
    """The model's raw replies, from pagoda.LLM in this process (LLM.chat passes tools to the template)."""
    from pagoda import LLM, SamplingParams

    llm = LLM(model=tool_model_dir, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=100, skip_special_tokens=False)
    outputs = llm.chat([ASK, history_after_call(), ASK_TWO], params, use_tqdm=False, tools=TOOLS)
    assert [o.outputs[0].text for o in outputs] == [
        call_block(PARIS), ANSWER, BOTH_INTRO + "\n" + call_block(PARIS) + "\n" + call_block(TOKYO)]
    assert_all_blocks_free(llm)


def test_tool_call_round_trip(tool_client):
    first = ask(tool_client, ASK)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(choice.message) == [("get_weather", PARIS)]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    # the client sends the call back with the tool's result; the model answers from it
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    second = ask(tool_client, history)
    assert second.choices[0].message.content == ANSWER
    assert not second.choices[0].message.tool_calls
    assert second.choices[0].finish_reason == "stop"


def test_parallel_calls_with_content(tool_client):
    message = ask(tool_client, ASK_TWO).choices[0].message
    assert message.content == BOTH_INTRO
    assert calls_of(message) == [("get_weather", PARIS), ("get_weather", TOKYO)]
    assert len({call.id for call in message.tool_calls}) == 2
    single = ask(tool_client, ASK_TWO, parallel_tool_calls=False).choices[0]
    assert calls_of(single.message) == [("get_weather", PARIS)] and single.finish_reason == "tool_calls"


def test_streamed_tool_calls_accumulate_in_the_client(tool_client):
    whole = ask(tool_client, ASK_TWO).choices[0]
    with tool_client.chat.completions.stream(model="tool-model", messages=ASK_TWO, tools=TOOLS, temperature=0,
                                             max_completion_tokens=100) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert final.message.content == whole.message.content
    assert calls_of(final.message) == calls_of(whole.message)
    assert all(call.id.startswith("chatcmpl-tool-") for call in final.message.tool_calls)
    # the arguments arrive in pieces as they are generated, each call's name once, in its first delta
    pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(pieces) > 2 * len(final.message.tool_calls)
    names = [tc.function.name for e in events if e.type == "chunk" and e.chunk.choices
             for tc in e.chunk.choices[0].delta.tool_calls or [] if tc.function and tc.function.name]
    assert names == ["get_weather", "get_weather"]


def test_streams_per_choice_with_logprobs_and_one_call(tool_client):
    chunks = list(tool_client.chat.completions.create(
        model="tool-model", messages=ASK_TWO, tools=TOOLS, temperature=0.5, seed=1, n=2, logprobs=True,
        parallel_tool_calls=False, max_completion_tokens=100, stream=True,
        extra_body={"top_k": 1}))  # top_k 1: sampled, yet both choices are the memorised reply
    for index in (0, 1):
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
        assert {tc.index for tc in calls} == {0} and [tc.function.name for tc in calls if tc.id] == ["get_weather"]
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == PARIS
        assert "".join(d.delta.content or "" for d in deltas) == BOTH_INTRO
        assert deltas[-1].finish_reason == "tool_calls"
        # every generated token's logprob is sent, also while the parser holds its text back
        tokens = sum(len(d.logprobs.content) for d in deltas if d.logprobs)
        whole = ask(tool_client, ASK_TWO, logprobs=True).choices[0].logprobs.content
        assert tokens == len(whole)


def test_tokenize_renders_the_tools_like_chat(tool_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    count = requests.post(tool_server.url + "/tokenize", json={"messages": ASK, "tools": TOOLS}, headers=headers,
                          timeout=60).json()["count"]
    without = requests.post(tool_server.url + "/tokenize", json={"messages": ASK}, headers=headers,
                            timeout=60).json()["count"]
    usage = post(tool_server, {"tools": TOOLS, "max_tokens": 1}).json()["usage"]
    assert count == usage["prompt_tokens"] > without


def test_stream_of_a_plain_answer_is_content(tool_client):
    history = history_after_call()
    chunks = list(tool_client.chat.completions.create(model="tool-model", messages=history, tools=TOOLS,
                                                      temperature=0, max_completion_tokens=100, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_none_is_plain_content(tool_client):
    choice = ask(tool_client, ASK, tool_choice="none").choices[0]
    assert choice.message.content == call_block(PARIS)  # the tools are still shown to the model, as in vLLM
    assert not choice.message.tool_calls and choice.finish_reason == "stop"


def test_named_function_gets_valid_arguments(tool_client):
    choice = ask(tool_client, ASK_TWO, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 max_completion_tokens=60).choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI answers a forced call
    (name, arguments), = calls_of(choice.message)
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER_PARAMETERS)


def test_required_tool_choice_gets_valid_calls(tool_client):
    # One call at most (parallel_tool_calls=false bounds the schema's array): the tiny model, left free, would
    # append calls until max_tokens.
    choice = ask(tool_client, ASK, tool_choice="required", parallel_tool_calls=False,
                 max_completion_tokens=120).choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = calls_of(choice.message)
    assert len(calls) == 1
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for name, arguments in calls:
        jsonschema.validate(arguments, parameters[name])


def test_streamed_named_function(tool_client):
    with tool_client.chat.completions.stream(model="tool-model", messages=ASK, tools=TOOLS, temperature=0,
                                             max_completion_tokens=60,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}
                                             ) as stream:
        final = stream.get_final_completion().choices[0]
    (name, arguments), = calls_of(final.message)
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER_PARAMETERS)


def post(server, body: dict) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time_zone"}}},
     "tool_choice", ["get_time_zone", "get_weather, get_time"]),
    ({"tool_choice": "required"}, "tool_choice", ["tools must be set"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", []),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", []),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     "messages", ["messages[1].tool_calls[0].function.arguments"]),
])
def test_bad_tool_requests_are_400(tool_server, body, param, words):
    response = post(tool_server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and (error["param"] or "").startswith(param), error
    assert all(word in error["message"] for word in words), error["message"]
    assert post(tool_server, {"max_tokens": 2}).status_code == 200  # the server serves everyone else


def test_auto_needs_the_server_flag(tiny_server):
    response = post(tiny_server, {"tools": TOOLS, "max_tokens": 2})  # tool_choice defaults to "auto"
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in error["message"] and "--tool-call-parser" in error["message"]
    # "none" needs no parser: the tools go to the template and the output is content
    response = post(tiny_server, {"tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["tool_calls"] is None


def test_blocks_all_come_back(tool_server):
    deadline = time.monotonic() + 10
    while (metrics := tool_server.metrics())["vllm:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)  # a closed stream's request is aborted by the engine's next step
    assert metrics["vllm:num_requests_running"] == 0 and metrics["vllm:kv_cache_usage_perc"] == 0.0


def serve(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


def test_tool_flags_are_checked_before_loading(tmp_path):
    result = serve("--enable-auto-tool-choice", "--tool-call-parser", "no_such_parser")
    assert result.returncode == 1
    assert "no_such_parser" in result.stderr and "hermes" in result.stderr and "llama3_json" in result.stderr
    result = serve("--enable-auto-tool-choice")
    assert result.returncode == 1 and "--tool-call-parser" in result.stderr
    result = serve("--tool-parser-plugin", str(tmp_path / "missing.py"), "--tool-call-parser", "hermes")
    assert result.returncode == 1 and "--tool-parser-plugin" in result.stderr
