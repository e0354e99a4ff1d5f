"""The LLM API: prompt forms, per-prompt params, order, chat templates, generation_config, tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import assert_all_blocks_free, bundled_gguf_path


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (and its chat template) and a generation_config."""
    import torch
    from pathlib import Path
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_text_llama")
    gguf = Path(bundled_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(do_sample=True, temperature=0.3, top_p=0.7, max_new_tokens=9, eos_token_id=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llm(text_model_dir):
    return LLM(text_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 26)


def test_prompt_forms_and_order(llm):
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    texts = ["Hello there", "The capital of France is", "a"]
    by_text = llm.generate(texts, greedy, use_tqdm=False)
    assert [o.prompt for o in by_text] == texts
    by_ids = llm.generate([{"prompt_token_ids": tokenizer.encode(t)} for t in texts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    single = llm.generate(texts[1], greedy)[0]
    assert single.outputs[0].text == by_text[1].outputs[0].text
    assert single.outputs[0].text == tokenizer.decode(single.outputs[0].token_ids)
    per_prompt = llm.generate(texts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 2, 3)],
                              use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [1, 2, 3]
    with pytest.raises(ValueError, match="sampling_params: got 2 for 3 prompts"):
        llm.generate(texts, [greedy, greedy])
    assert_all_blocks_free(llm)


def test_bad_requests_are_rejected_and_the_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt: the prompt is empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate({"prompt_token_ids": [10 ** 7]}, use_tqdm=False)
    with pytest.raises(ValueError, match="maximum model length is 512"):
        llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs: 50 is more than max_logprobs"):
        llm.generate("hi", SamplingParams(logprobs=50), use_tqdm=False)
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    assert_all_blocks_free(llm)


def test_chat_uses_the_chat_template(llm):
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    flat = [messages[0], {"role": "user", "content": "What is the capital of France?"}]
    expected = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    assert expected.endswith("<|im_start|>assistant\n")
    two = llm.chat([flat, flat[1:]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(two) == 2
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        llm.chat([{"role": "wizard", "content": "x"}])
    custom = llm.chat(flat[1:], SamplingParams(max_tokens=1), use_tqdm=False,
                      chat_template="{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    assert custom[0].prompt == "<<What is the capital of France?>>"


def test_generation_config_defaults(text_model_dir, llm, tmp_path):
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.max_tokens) == (0.3, 0.7, 9)
    plain = LLM(text_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 24, generation_config="vllm")
    assert plain.get_default_sampling_params().temperature == 1.0
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.11}))
    other = LLM(text_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 24, generation_config=str(folder))
    assert other.get_default_sampling_params().temperature == 0.11


def test_tokenizer_override(text_model_dir, tmp_path):
    copy = tmp_path / "model_without_tokenizer"
    shutil.copytree(text_model_dir, copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (copy / name).unlink(missing_ok=True)
    llm = LLM(str(copy), tokenizer=text_model_dir, dtype="float32", kv_cache_memory_bytes=1 << 24)
    from transformers import AutoTokenizer

    assert llm.get_tokenizer().encode("hello world") == AutoTokenizer.from_pretrained(text_model_dir).encode(
        "hello world")
    assert llm.generate("hello", SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
