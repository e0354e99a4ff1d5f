"""A tiny model (hidden 64, 2 layers) that calls tools: trained until it has memorised its replies to a few
conversations rendered with the Hermes tool template, so greedy decoding reproduces them exactly and the
server's tool-call handling can be checked on real engine output.

Its tokenizer is a small byte-level BPE (any text encodes) with ``<tool_call>`` / ``</tool_call>`` as added
tokens, as Qwen 2.5's tokenizer has them; ``<|im_end|>`` ends a reply.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.entrypoints.openai.conftest import save_model_dir

REPO_ROOT = Path(__file__).resolve().parents[3]
HERMES_TEMPLATE = REPO_ROOT / "examples" / "tool_chat_template_hermes.jinja"

WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
PARIS = {"city": "Paris", "unit": "celsius"}
TOKYO = {"city": "Tokyo", "unit": "celsius"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TWO = [{"role": "user", "content": "Compare the weather in Paris and Tokyo."}]
RESULT = '{"temperature": 18, "sky": "sunny"}'
ANSWER = "It is 18 degrees and sunny in Paris."
BOTH_INTRO = "Let me look both up."


def call_block(arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": arguments}) + "\n</tool_call>"


def history_after_call(call_id: str = "call_0") -> list[dict]:
    """ASK, the assistant's call (as a client sends it back) and the tool's result."""
    call = {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}
    return [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": RESULT}]


#: (messages, reply) pairs the model memorises, all rendered with TOOLS.
CONVERSATIONS = [(ASK, call_block(PARIS)),
                 (history_after_call(), ANSWER),
                 (ASK_TWO, BOTH_INTRO + "\n" + call_block(PARIS) + "\n" + call_block(TOKYO))]


def _tokenizer(template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [template, json.dumps(TOOLS), RESULT, ANSWER, BOTH_INTRO, json.dumps(PARIS), json.dumps(TOKYO)]
    corpus += [m["content"] for messages, _ in CONVERSATIONS for m in messages if m.get("content")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.chat_template = template
    return tokenizer


def build_tool_model(target: Path, max_steps: int = 600) -> None:
    """Train and save the model at ``target`` (a few seconds on one core)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagoda.entrypoints.chat_utils import apply_chat_template

    tokenizer = _tokenizer(HERMES_TEMPLATE.read_text())
    eos = tokenizer.eos_token_id
    examples = []
    for messages, reply in CONVERSATIONS:
        prompt = tokenizer.encode(apply_chat_template(tokenizer, messages, tools=TOOLS), add_special_tokens=False)
        answer = tokenizer.encode(reply, add_special_tokens=False) + [eos]
        examples.append((torch.tensor([prompt + answer[:-1]]), torch.tensor(answer), len(prompt) - 1))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, tie_word_embeddings=True,
                         rope_theta=10000.0)
    torch.manual_seed(16)
    model = LlamaForCausalLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread; more only wait on each other
    try:
        _train(model, examples, max_steps)
    finally:
        torch.set_num_threads(threads)
    save_model_dir(model, tokenizer, target)


def _train(model, examples, max_steps: int) -> None:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(max_steps):
        optimizer.zero_grad()
        worst_margin = float("inf")
        for ids, answer, start in examples:
            logits = model(ids).logits[0, start:]
            torch.nn.functional.cross_entropy(logits, answer).backward()
            with torch.no_grad():  # how far each memorised token is ahead of the runner-up
                chosen = logits.gather(1, answer[:, None])[:, 0]
                others = logits.scatter(1, answer[:, None], float("-inf")).max(dim=1).values
                worst_margin = min(worst_margin, (chosen - others).min().item())
        if worst_margin > 4.0:  # wide margins: greedy decoding can't flip a token on other kernels
            break
        optimizer.step()
    else:
        raise RuntimeError(f"the tool model didn't memorise its replies in {max_steps} steps")
