"""Tool parsers on model-style outputs: whole-output extraction, and the same outputs streamed token by token
through the bundled model's tokenizer and pagoda's incremental detokenizer, reassembled with the ``openai``
client's own delta accumulation — the stream must add up to the whole extraction."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openai.lib.streaming._deltas import accumulate_delta

from pagoda.core.detokenizer import IncrementalDetokenizer
from pagoda.entrypoints.chat_utils import apply_chat_template
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.tool_calling import NamedToolParser, RequiredToolParser, required_schema
from pagoda.entrypoints.openai.tool_parsers import ToolParserManager
from pagoda.sampling_params import SamplingParams
from tests.entrypoints.openai.conftest import smollm2_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
HERMES_TEMPLATE = REPO_ROOT / "examples" / "tool_chat_template_hermes.jinja"

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TRICKY = {"name": "search", "arguments": {"query": "a \"quoted\" } brace and </tool_call> text", "k": 3,
                                          "filters": {"lang": ["fr", "日本語"], "safe": True, "min": -1.5e3,
                                                      "none": None}}}


def hermes_block(call: dict) -> str:
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


HERMES_CASES = {
    "one call": hermes_block(WEATHER),
    "content and two calls": "Let me check both.\n" + hermes_block(WEATHER) + "\n" + hermes_block(TRICKY) + "\n",
    "compact json": '<tool_call>{"name":"f","arguments":{}}</tool_call>',
    "content around": "Before " + hermes_block(WEATHER) + " after.",
    "arguments before name": '<tool_call>\n{"arguments": {"x": [1, 2]}, "name": "g"}\n</tool_call>',
    "arguments as a string": '<tool_call>{"name": "h", "arguments": "{\\"a\\": 1}"}</tool_call>',
    "no call": "The weather in Paris is <b>sunny</b>; a < b and <tool is not a tag.\n",
    "unclosed last block": "<tool_call>\n" + json.dumps(WEATHER),
}
LLAMA_CASES = {
    "python tag": "<|python_tag|>" + json.dumps({"name": "get_weather", "parameters": WEATHER["arguments"]}),
    "plain json": json.dumps({"name": "get_weather", "parameters": {"city": "Tokyo"}}),
    "several": "; ".join(json.dumps(c) for c in (WEATHER, {"name": "search", "parameters": TRICKY["arguments"]})),
    "leading whitespace": "\n " + json.dumps({"name": "noop", "parameters": {}}),
    "no call": "It is sunny in Paris.",
    "not a python tag": "<|python is not a tag",
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def request(**fields) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                 **fields})


def stream(parser, tokenizer, output: str, skip_special_tokens: bool = True) -> tuple[dict, list]:
    """Feed ``output``'s tokens one by one through the detokenizer and the parser's streaming extractor;
    returns the message as the openai client accumulates it, and the deltas."""
    ids = tokenizer.encode(output, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip_special_tokens))
    text, previous_ids, deltas = "", [], []
    for token_id in ids:
        piece = detokenizer.update([token_id])
        deltas.append(parser.extract_tool_calls_streaming(text, text + piece, piece, previous_ids,
                                                          previous_ids + [token_id], [token_id], None))
        text, previous_ids = text + piece, previous_ids + [token_id]
    assert text == output  # the tokenizer round-trips these outputs
    deltas.append(parser.finish_streaming(text, None))
    message: dict = {}
    for delta in deltas:
        if delta is not None:
            accumulate_delta(message, delta.model_dump(exclude_none=True))
    return message, [d for d in deltas if d is not None]


def check_stream_matches_whole(parser_cls, tokenizer, output: str):
    whole = parser_cls(tokenizer).extract_tool_calls(output, None)
    message, deltas = stream(parser_cls(tokenizer), tokenizer, output)
    assert (message.get("content") or None) == whole.content
    calls = message.get("tool_calls", [])
    assert [(c["function"]["name"], c["function"].get("arguments", "")) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.tool_calls]
    for index, call in enumerate(calls):
        assert call["index"] == index and call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    # the id, type and name come once, in each call's first delta
    firsts = [tc for d in deltas for tc in d.tool_calls or [] if tc.id is not None]
    assert [tc.index for tc in firsts] == list(range(len(calls)))
    assert all(tc.function.name for tc in firsts)
    assert all(tc.function is None or tc.function.name is None for d in deltas for tc in d.tool_calls or []
               if tc.id is None)
    return whole


@pytest.mark.parametrize("case", HERMES_CASES)
def test_hermes_stream_equals_whole_output(tokenizer, case):
    output = HERMES_CASES[case]
    whole = check_stream_matches_whole(ToolParserManager.get_tool_parser("hermes"), tokenizer, output)
    if case == "no call":
        assert not whole.tools_called and whole.content == output
    else:
        assert whole.tools_called


def test_hermes_whole_output_values():
    parser = ToolParserManager.get_tool_parser("hermes")(None)
    info = parser.extract_tool_calls(HERMES_CASES["content and two calls"], None)
    assert info.content == "Let me check both."
    assert [c.function.name for c in info.tool_calls] == ["get_weather", "search"]
    assert [json.loads(c.function.arguments) for c in info.tool_calls] == [WEATHER["arguments"],
                                                                           TRICKY["arguments"]]
    assert len({c.id for c in info.tool_calls}) == 2
    assert parser.extract_tool_calls(HERMES_CASES["content around"], None).content == "Before  after."
    assert json.loads(parser.extract_tool_calls(HERMES_CASES["arguments as a string"], None)
                      .tool_calls[0].function.arguments) == {"a": 1}


@pytest.mark.parametrize("output", ["<tool_call>", "<tool_call>\n", '<tool_call>\n{"name": "f", "argu',
                                    "<tool_call>{not json}</tool_call>", "<tool_call>[1, 2]</tool_call>",
                                    '<tool_call>{"arguments": {}}</tool_call>',
                                    '<tool_call>{"name": "f"} trailing</tool_call>'])
def test_hermes_malformed_call_is_content(output):
    info = ToolParserManager.get_tool_parser("hermes")(None).extract_tool_calls(output, None)
    assert not info.tools_called and info.tool_calls == [] and info.content == output


def test_hermes_keeps_special_tokens_for_tool_requests():
    parser = ToolParserManager.get_tool_parser("hermes")(None)
    assert parser.adjust_request(request(tool_choice="auto")).skip_special_tokens is False
    assert parser.adjust_request(request(tool_choice="none")).skip_special_tokens is True


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama3_json_stream_equals_whole_output(tokenizer, case):
    output = LLAMA_CASES[case]
    whole = check_stream_matches_whole(ToolParserManager.get_tool_parser("llama3_json"), tokenizer, output)
    assert whole.tools_called == (not case.startswith("no") and not case.startswith("not"))


def test_llama3_json_whole_output_values():
    parser = ToolParserManager.get_tool_parser("llama3_json")(None)
    info = parser.extract_tool_calls(LLAMA_CASES["several"], None)
    assert info.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == \
        [("get_weather", WEATHER["arguments"]), ("search", TRICKY["arguments"])]
    for output in ('{"name": "f", "parameters": {}} and some text', '{"no name": 1}', "{broken", "<|python_tag|>",
                   '<|python_tag|>{"name": "f", "param'):
        info = parser.extract_tool_calls(output, None)
        assert not info.tools_called and info.content == output


def test_required_and_named_parsers_stream_equals_whole(tokenizer):
    output = json.dumps([{"name": "get_weather", "parameters": WEATHER["arguments"]},
                         {"name": "search", "parameters": TRICKY["arguments"]}], ensure_ascii=False, indent=1)
    whole = check_stream_matches_whole(RequiredToolParser, tokenizer, output)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == \
        [("get_weather", WEATHER["arguments"]), ("search", TRICKY["arguments"])]
    assert not RequiredToolParser(None).extract_tool_calls('{"name": "f"}', None).tools_called

    def named(t):
        return NamedToolParser(t, "get_weather")
    whole = check_stream_matches_whole(named, tokenizer, json.dumps(WEATHER["arguments"]))
    assert whole.tool_calls[0].function.name == "get_weather"


def test_registry_lists_parsers_and_loads_plugins(tmp_path):
    with pytest.raises(KeyError, match="registered parsers: .*hermes.*llama3_json"):
        ToolParserManager.get_tool_parser("no-such-parser")
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from pagoda.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager, "
        "ExtractedToolCallInformation\n"
        "@ToolParserManager.register_module('all_content')\n"
        "class AllContent(ToolParser):\n"
        "    def extract_tool_calls(self, model_output, request):\n"
        "        return ExtractedToolCallInformation(tools_called=False, content=model_output)\n")
    try:
        ToolParserManager.import_tool_parser(str(plugin))
        parser = ToolParserManager.get_tool_parser("all_content")(None)
        assert parser.extract_tool_calls("x", None).content == "x"
    finally:
        ToolParserManager.tool_parsers.pop("all_content", None)
    with pytest.raises(FileNotFoundError, match="--tool-parser-plugin"):
        ToolParserManager.import_tool_parser(str(tmp_path / "missing.py"))


def test_required_schema_accepts_exactly_calls_to_the_tools():
    defs = {"Unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}
    tools = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"},
                                                              "unit": {"$ref": "#/$defs/Unit"}},
                             "required": ["city"], "$defs": defs},
             "noop": {"type": "object", "properties": {}}}
    schema = required_schema(tools, parallel=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    valid = [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}},
             {"name": "noop", "parameters": {}}]
    jsonschema.validate(valid, schema)
    for invalid in ([], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                    [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}],
                    [{"name": "noop"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invalid, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(valid, required_schema(tools, parallel=False))


def test_chat_template_renders_tools_and_tool_messages(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    text = apply_chat_template(tokenizer, messages, chat_template=str(HERMES_TEMPLATE), tools=tools)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{city"
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        apply_chat_template(tokenizer, messages, chat_template=str(HERMES_TEMPLATE), tools=tools)


def test_required_and_named_choices_constrain_the_output():
    from pagoda.entrypoints.openai.serving_engine import APIError, ServerConfig
    from pagoda.entrypoints.openai.tool_calling import RequestToolCalling
    from pagoda.sampling_params import StructuredOutputsParams

    config = ServerConfig(served_model_names=["m"], enable_auto_tool_choice=True, tool_call_parser="hermes")
    parameters = request().tools[0].function.parameters

    def constraint(**fields):
        params = SamplingParams()
        RequestToolCalling.from_request(request(**fields), config, None).constrain(params)
        return params.structured_outputs

    assert constraint(tool_choice={"type": "function", "function": {"name": "get_weather"}}).json == parameters
    assert constraint(tool_choice="required").json == required_schema({"get_weather": parameters}, parallel=True)
    assert constraint(tool_choice="required", parallel_tool_calls=False).json["maxItems"] == 1
    assert constraint(tool_choice="auto") is None
    assert RequestToolCalling.from_request(request(tool_choice="none"), config, None) is None
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    with pytest.raises(APIError, match="response_format"):
        RequestToolCalling.from_request(request(tool_choice="required"), config, None).constrain(params)


def test_mutated_outputs_never_break_a_stream():
    """Outputs with random edits, streamed in random pieces: no exception, calls indexed 0, 1, … each with its
    name, and wherever the whole extraction finds calls the stream sent exactly those (and the same content)."""
    import random

    rng = random.Random(16)
    alphabet = '{}[]":,;\\ <>/tool_call|python_tag\n0123456789truefalsenull'
    required = json.dumps([{"name": "get_weather", "parameters": WEATHER["arguments"]},
                           {"name": "noop", "parameters": {}}])
    cases = [(ToolParserManager.get_tool_parser("hermes"), o) for o in HERMES_CASES.values()]
    cases += [(ToolParserManager.get_tool_parser("llama3_json"), o) for o in LLAMA_CASES.values()]
    cases += [(RequiredToolParser, required)]
    for parser_cls, output in cases:
        for _ in range(60):
            chars = list(output)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(chars) + 1)
                if rng.random() < 0.4 and chars:
                    del chars[min(i, len(chars) - 1)]
                else:
                    chars.insert(i, rng.choice(alphabet))
            mutated = "".join(chars)
            whole = parser_cls(None).extract_tool_calls(mutated, None)
            parser, text, message = parser_cls(None), "", {}
            while len(text) < len(mutated):
                piece = mutated[len(text):len(text) + rng.randint(1, 6)]
                delta = parser.extract_tool_calls_streaming(text, text + piece, piece, (), (), (), None)
                text += piece
                if delta is not None:
                    accumulate_delta(message, delta.model_dump(exclude_none=True))
            if (delta := parser.finish_streaming(text, None)) is not None:
                accumulate_delta(message, delta.model_dump(exclude_none=True))
            calls = message.get("tool_calls", [])
            assert all(c["index"] == k and c["function"].get("name") for k, c in enumerate(calls)), mutated
            if whole.tools_called:
                assert (message.get("content") or None) == whole.content, mutated
                assert [(c["function"]["name"], c["function"].get("arguments", "")) for c in calls] == \
                    [(c.function.name, c.function.arguments) for c in whole.tool_calls], mutated
