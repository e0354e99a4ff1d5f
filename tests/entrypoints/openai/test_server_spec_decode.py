"""``pagoda serve --speculative-config``: greedy completions equal the engine's without speculation, the
acceptance counters are on ``/metrics`` under vLLM's names and in the periodic stats log, and a bad config
stops the server at start with an error naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pagoda import SamplingParams
from tests.entrypoints.openai.conftest import REPO_ROOT, TINY_ARGS, ServerProcess

PASSAGE = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door. ")
PROMPT = f"Repeat this passage exactly: {PASSAGE}\nPassage: {PASSAGE}\nAgain: {PASSAGE}"


@pytest.fixture(scope="module")
def spec_server(tiny_chat_model_dir):
    # The model as its own draft: drafts every step (a random model's text seldom repeats for n-gram lookup).
    config = {"model": tiny_chat_model_dir, "num_speculative_tokens": 3}
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, "--speculative-config", json.dumps(config)])
    yield server
    server.stop()


def test_greedy_completion_equals_plain_decoding_and_metrics(spec_server, reference_llm):
    import openai

    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    expected = reference_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
                                      use_tqdm=False)[0].outputs[0].text
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=48, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].text == expected
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=48, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected

    metrics = spec_server.metrics()
    drafts = metrics["vllm:spec_decode_num_drafts_total"]
    draft_tokens = metrics["vllm:spec_decode_num_draft_tokens_total"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and draft_tokens >= drafts and accepted == draft_tokens  # its own draft: all accepted
    # Summed over the position label: every accepted token was accepted at some position.
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos_total"] == accepted
    # The periodic stats line (every 2 s in the tests) reports the acceptance so far.
    deadline = time.monotonic() + 10
    while "speculative decoding: acceptance rate 100.0%" not in spec_server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "speculative decoding: acceptance rate 100.0%, mean accepted length" in spec_server.output()


def test_bad_speculative_config_fails_at_start(tiny_chat_model_dir):
    bad = json.dumps({"method": "eagle3", "num_speculative_tokens": 2})
    result = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", tiny_chat_model_dir,
                             *TINY_ARGS, "--speculative-config", bad], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode != 0
    assert "speculative_config.method" in result.stderr and "ngram, draft_model" in result.stderr
