"""Structured outputs (xgrammar): every sampled output of a constrained request is in its constraint's language
(checked with ``jsonschema``, ``re`` and membership), greedy constrained decoding equals transformers' logits with
the same xgrammar mask applied by hand, and forks, preemption, waiting for a grammar and bad constraints behave."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.core.request import RequestStatus
from pagoda.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from tests.conftest import assert_all_blocks_free
from tests.entrypoints.openai.conftest import tiny_chat_model_dir  # noqa: F401 - a fixture

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "pet"],
}
SEEDS = range(3)


def _outside_strings(text: str) -> str:
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def constrained(temperature: float = 1.0, seed: int | None = None, max_tokens: int = 80, **constraint):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module")
def llm(tiny_chat_model_dir):  # noqa: F811
    return LLM(tiny_chat_model_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 25, seed=0)


def test_sampled_json_batched_with_unconstrained(llm):
    params = [constrained(seed=s, json=SCHEMA, disable_any_whitespace=True) for s in SEEDS]
    free = SamplingParams(temperature=1.0, seed=7, max_tokens=12)
    outputs = llm.generate(["Describe a person.", "Hi", "JSON please", "Tell me"], params + [free],
                           use_tqdm=False)
    for out in outputs[:-1]:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
        # disable_any_whitespace: json.dumps' separators, no other whitespace
        assert not re.search(r"\s\s|[\n\r\t]|\s[^\s]*\s",
                             _outside_strings(completion.text).replace(", ", ",").replace(": ", ":"))
    # The unconstrained row in the batch is untouched by its neighbours' masks.
    alone = llm.generate(["Tell me"], free, use_tqdm=False)[0].outputs[0]
    assert outputs[-1].outputs[0].token_ids == alone.token_ids
    assert_all_blocks_free(llm)


def test_sampled_regex_choice_grammar_and_json_object(llm):
    regex = r"[a-z]{2,5}-\d{2}(\.[A-Z])?"
    grammar = 'root ::= greeting " " name\ngreeting ::= "hi" | "hello"\nname ::= [a-z] [a-z]? [a-z]?'
    lark = 'start: ("yes" | "no") "!"'
    choices = ["red", "green", 'blue "sky"', "naïve\n"]
    for seed in SEEDS:
        regex_out, choice_out, grammar_out, lark_out = (o.outputs[0] for o in llm.generate(
            ["a", "b", "c", "d"],
            [constrained(seed=seed, regex=regex), constrained(seed=seed, choice=choices),
             constrained(seed=seed, grammar=grammar), constrained(seed=seed, grammar=lark)], use_tqdm=False))
        assert re.fullmatch(regex, regex_out.text) and regex_out.finish_reason == "stop"
        assert choice_out.text in choices and choice_out.finish_reason == "stop"
        assert re.fullmatch(r"(hi|hello) [a-z]{1,3}", grammar_out.text)
        assert lark_out.text in ("yes!", "no!")
    # Any JSON object: string contents are nearly the whole vocabulary, so a random model favoured towards
    # closing quotes and braces (logit_bias) ends its object within the budget.
    closers = {t: 8.0 for t in llm.get_tokenizer().convert_tokens_to_ids(['"', "}", '"}'])}
    obj = llm.generate("{", SamplingParams(seed=2, max_tokens=100, logit_bias=closers, structured_outputs=(
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True))), use_tqdm=False)[0].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text
    assert_all_blocks_free(llm)


def test_structural_tag_and_whitespace_pattern(llm):
    from pagoda.core.structured_output import grammar_spec, parse_grammar

    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                                "content": {"type": "regex", "pattern": "[0-9]{2}"}}}
    out = llm.generate("q", constrained(seed=3, max_tokens=20, structural_tag=json.dumps(tag)),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"<answer>[0-9]{2}</answer>", out.text), out.text
    # vLLM's first structural-tag format: tagged JSON after trigger strings
    legacy = {"structures": [{"begin": "<f=a>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f="]}
    parse_grammar(grammar_spec(StructuredOutputsParams(structural_tag=json.dumps(legacy))))
    # Whitespace between JSON tokens: exactly one space where the grammar allows any.
    for out in llm.generate(["q", "r"], [constrained(seed=seed, json=SCHEMA, whitespace_pattern=" ")
                                         for seed in (0, 1)], use_tqdm=False):
        text = out.outputs[0].text
        jsonschema.validate(json.loads(text), SCHEMA)
        outside_strings = _outside_strings(text)
        assert re.fullmatch(r"\{ .* \}", outside_strings) and "  " not in outside_strings and "\n" not in text


def _masked_greedy_reference(model_dir: str, prompt: list[int], regex: str, max_tokens: int) -> list[int]:
    """transformers' logits, xgrammar's mask applied by hand, argmax, until the grammar's stop token."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(regex))
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax())
            out.append(token)
            assert matcher.accept_token(token)
            if matcher.is_terminated():
                break
            ids.append(token)
    return out


@pytest.mark.parametrize("greedy_head", [True, False])
def test_greedy_equals_masked_transformers_logits(llm, tiny_chat_model_dir, greedy_head):  # noqa: F811
    regex = r"(abc|[a-z]{3,8})@[a-z]{2,6}\.(com|org)"
    prompt = llm.get_tokenizer().encode("Write an email address:")
    expected = _masked_greedy_reference(tiny_chat_model_dir, prompt, regex, 40)
    llm.llm_engine.runner.greedy_head = greedy_head  # the LM head's argmax shortcut, or logits through the sampler
    try:
        out = llm.generate({"prompt_token_ids": prompt}, constrained(temperature=0, max_tokens=40, regex=regex),
                           use_tqdm=False)[0].outputs[0]
    finally:
        llm.llm_engine.runner.greedy_head = True
    assert out.token_ids == expected
    assert re.fullmatch(regex, out.text) and out.finish_reason == "stop"


def test_greedy_batch_of_constrained_and_free_rows(llm):
    """Greedy rows with and without a constraint in one step: each equals its run alone."""
    prompts = ["One", "Two", "Three", "Four"]
    params = [constrained(temperature=0, max_tokens=12, regex=r"[a-z]{2,6}( [a-z]{2,6}){1,2}"),
              SamplingParams(temperature=0, max_tokens=12),
              constrained(temperature=0, max_tokens=12, choice=["left", "right"]),
              SamplingParams(temperature=0, max_tokens=12)]
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, together):
        assert out.outputs[0].token_ids == llm.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids


def test_settings_that_leave_no_allowed_token_end_the_request(llm):
    digit_free = llm.get_tokenizer().convert_tokens_to_ids(["a"])
    params = SamplingParams(temperature=0, max_tokens=8, allowed_token_ids=digit_free,
                            structured_outputs=StructuredOutputsParams(regex="[0-9]{3}"))
    bad, good = llm.generate(["x", "y"], [params, constrained(seed=1, max_tokens=8, regex="[0-9]{3}")],
                             use_tqdm=False)
    assert bad.outputs[0].finish_reason == "abort"
    assert re.fullmatch("[0-9]{3}", good.outputs[0].text)
    assert_all_blocks_free(llm)


def test_forked_samples_each_follow_the_grammar(llm):
    regex = r"(up|down|left|right)( (up|down|left|right)){0,3}"
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(regex=regex))
    out = llm.generate("moves:", params, use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        assert re.fullmatch(regex, completion.text), completion.text
    assert len({c.text for c in out.outputs}) > 1  # the samples diverged, each with its own matcher
    assert_all_blocks_free(llm)


def test_preemption_keeps_each_matcher_right(tiny_chat_model_dir):  # noqa: F811
    prompts = [f"Record number {i}:" for i in range(5)]
    params = [constrained(temperature=0, max_tokens=60, json=SCHEMA, disable_any_whitespace=True)
              for _ in prompts]
    roomy = LLM(tiny_chat_model_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 25)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM(tiny_chat_model_dir, dtype="float32", max_model_len=512, num_gpu_blocks_override=12, block_size=8)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for out in outputs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert_all_blocks_free(tight)


def test_request_waits_for_its_grammar_without_holding_up_others(tiny_chat_model_dir):  # noqa: F811
    llm = LLM(tiny_chat_model_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 24)
    engine = llm.llm_engine
    engine.add_request("constrained", "a", constrained(seed=1, max_tokens=20, regex=r"[0-9]{4}"))
    engine.add_request("free", "b", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    # The first constrained request builds xgrammar's vocabulary (~0.1 s): its grammar is not ready yet.
    request = engine.structured_output.pending["constrained"][0]
    assert request.status == RequestStatus.WAITING_FOR_FSM and "constrained" not in engine.scheduler.requests
    engine.step()
    assert "free" in engine.scheduler.requests and engine.scheduler.requests["free"].output_token_ids
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch(r"[0-9]{4}", finished["constrained"].outputs[0].text)
    assert len(finished["free"].outputs[0].token_ids) == 3
    # The same grammar again is cached: the request goes straight to the scheduler.
    engine.add_request("again", "c", constrained(seed=2, max_tokens=20, regex=r"[0-9]{4}"))
    assert "again" in engine.scheduler.requests and not engine.structured_output.pending
    engine.abort_request("again")
    # Aborted while (perhaps) still compiling: nothing is left behind either way.
    engine.add_request("gone", "d", constrained(seed=3, max_tokens=20, regex=r"[xy]{7}"))
    engine.abort_request("gone")
    assert not engine.has_unfinished_requests() and not engine.structured_output.pending
    assert_all_blocks_free(llm)


def test_grammar_end_stops_even_with_ignore_eos(llm):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=30, ignore_eos=True,
                            guided_decoding=GuidedDecodingParams(choice=["alpha", "beta"]))
    assert params.structured_outputs.choice == ["alpha", "beta"]
    out = llm.generate("pick", params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"


@pytest.mark.parametrize(("constraint", "message"), [
    ({"json": '{"type": '}, "json is not valid JSON"),
    ({"json": {"type": "strin"}}, 'invalid JSON schema: Unsupported type "strin"'),
    ({"json": {"type": "array", "uniqueItems": True}}, "keyword 'uniqueItems' (at #) is not supported"),
    ({"json": {"type": "string", "format": "phone"}}, "string format 'phone'"),
    ({"regex": "(ab"}, "invalid regex: Regex parsing error at position 4: The parenthesis is not closed"),
    ({"grammar": "root ::= foo"}, 'invalid grammar: EBNF parser error at line 1, column 10: Rule "foo" is not '
                                  "defined"),
    ({"choice": ["a"], "whitespace_pattern": " "}, "whitespace_pattern applies to json"),
    ({"structural_tag": "{}"}, "invalid structural_tag"),
])
def test_invalid_constraints_are_value_errors(llm, constraint, message):
    good = constrained(seed=0, max_tokens=5, regex="[ab]+")
    with pytest.raises(ValueError, match="structured_outputs: .*" + re.escape(message)):
        llm.generate(["ok", "bad"], [good, constrained(**constraint)], use_tqdm=False)
    assert_all_blocks_free(llm)  # the good request added before the bad one was not left behind


def test_backend_and_tokenizer_checks(tiny_chat_model_dir):  # noqa: F811
    import argparse

    from pagoda.core.engine_args import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
                              "--guided-decoding-backend", "auto"])
    with pytest.raises(ValueError, match="contradicts"):
        EngineArgs.from_cli_args(args)
    for bad in ({"structured_outputs_config": {"backend": "outlines"}}, {"guided_decoding_backend": "guidance"},
                {"guided_decoding_backend": "lm-format-enforcer"}):
        with pytest.raises(ValueError, match="only the xgrammar backend is supported"):
            EngineArgs(**bad)
    with pytest.raises(ValueError, match="unknown key.*reasoning_parser"):
        EngineArgs(structured_outputs_config={"reasoning_parser": "x"})
    llm = LLM(tiny_chat_model_dir, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 22,
              skip_tokenizer_init=True, structured_outputs_config={"backend": "xgrammar"})
    with pytest.raises(ValueError, match="need the tokenizer"):
        llm.generate({"prompt_token_ids": [1, 2]}, constrained(regex="a"), use_tqdm=False)


def test_bundled_gguf_model_json():
    """The bundled model: its tokenizer is built from the GGUF file's metadata."""
    llm = LLM(max_model_len=512, kv_cache_memory_bytes=1 << 25,
              structured_outputs_config={"disable_any_whitespace": True})
    messages = [{"role": "user", "content": "Give me a person as JSON with name, age, pet and tags."}]
    outputs = llm.chat([messages, messages], [constrained(seed=seed, max_tokens=80, json=SCHEMA) for seed in (0, 1)],
                       use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert_all_blocks_free(llm)


def test_bf16_greedy_head_takes_the_mask(tiny_chat_model_dir):  # noqa: F811
    """bf16 on the native CPU kernels: the LM head's argmax runs over the allowed tokens itself
    (``compute_greedy(hidden, allowed)``), and gives the tokens the masked logits give."""
    llm = LLM(tiny_chat_model_dir, dtype="bfloat16", max_model_len=256, kv_cache_memory_bytes=1 << 24, seed=0)
    model = llm.llm_engine.runner.model
    hidden = torch.randn(3, model.config.hidden_size).bfloat16()
    vocab = model.config.vocab_size
    allowed = torch.zeros(3, (vocab + 31) // 32, dtype=torch.int32)
    allowed[:, 1] = 1 << 5  # token 37 only
    masked = model.compute_greedy(hidden, allowed)
    if masked is None:
        pytest.skip("this platform's LM head has no argmax kernel for bf16")
    assert masked.tolist() == [37, 37, 37]
    regex = r"[a-z]{2,6}( [a-z]{2,6}){1,2}"
    prompts = ["One", "Two", "Three"]
    params = [constrained(temperature=0, max_tokens=16, regex=regex), SamplingParams(temperature=0, max_tokens=8),
              constrained(temperature=0, max_tokens=16, choice=["left", "right", "up"])]
    runs = {}
    for greedy_head in (True, False):
        llm.llm_engine.runner.greedy_head = greedy_head
        runs[greedy_head] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.llm_engine.runner.greedy_head = True
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    first, _, third = runs[True]
    assert first.finish_reason == "length" or re.fullmatch(regex, first.text), first.text
    assert third.text in ("left", "right", "up") and third.finish_reason == "stop"
    assert_all_blocks_free(llm)
