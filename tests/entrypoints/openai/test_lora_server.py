"""Multi-LoRA on the server: ``--enable-lora --lora-modules``, adapters in ``/v1/models`` and chosen by ``model``,
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, and
``vllm:lora_requests_info`` — the real ``openai`` client against a live server, checked against ``pagoda.LLM``
with the same adapters in this process (greedy)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
import requests
import torch

from pagoda import SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free
from tests.entrypoints.openai.conftest import REPO_ROOT, TINY_ARGS, ServerProcess

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "3"]


def make_peft_adapter(base_dir: str, out_dir: str, seed: int) -> str:
    """A rank-8 PEFT adapter on every projection, with random non-zero A and B (PEFT starts B at zero, which
    would leave the model unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_chat_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_server")
    return {name: make_peft_adapter(tiny_chat_model_dir, str(root / name), seed)
            for seed, name in enumerate(("a1", "a2", "a3"), start=7)}


@pytest.fixture(scope="module")
def lora_server(tiny_chat_model_dir, adapters):
    a2 = json.dumps({"name": "a2", "path": adapters["a2"], "base_model_name": tiny_chat_model_dir})
    server = ServerProcess([tiny_chat_model_dir, *TINY_ARGS, *LORA_ARGS, "--lora-modules", f"a1={adapters['a1']}",
                            a2], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lora_client(lora_server):
    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lora_llm(tiny_chat_model_dir):
    from pagoda import LLM

    return LLM(model=tiny_chat_model_dir, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20,
               enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=3)


def expected_text(llm, adapters, name: str | None, max_tokens: int, chat: bool = False) -> str:
    lora = LoRARequest(name, int(name[1:]), adapters[name]) if name else None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if chat:
        output = llm.chat(MESSAGES, params, use_tqdm=False, lora_request=lora)
    else:
        output = llm.generate(PROMPT, params, use_tqdm=False, lora_request=lora)
    return output[0].outputs[0].text


def wait_idle(server) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while (metrics := server.metrics())["vllm:num_requests_running"] or metrics["vllm:kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    return metrics


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url + route, json=body, timeout=60)


def test_models_lists_adapters_with_their_base(lora_client, tiny_chat_model_dir, adapters):
    cards = {m.id: m for m in lora_client.models.list().data}
    assert list(cards) == [tiny_chat_model_dir, "a1", "a2"]
    for name in ("a1", "a2"):
        assert cards[name].model_extra["parent"] == tiny_chat_model_dir
        assert cards[name].model_extra["root"] == adapters[name]
    assert cards[tiny_chat_model_dir].model_extra["parent"] is None


def test_completions_and_chat_through_adapters_equal_llm(lora_client, lora_llm, lora_server, adapters,
                                                        tiny_chat_model_dir):
    texts = {}
    for name in (None, "a1", "a2"):
        model = name or tiny_chat_model_dir
        response = lora_client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                  extra_body={"ignore_eos": True})
        assert response.model == model
        texts[name] = response.choices[0].text
        assert texts[name] == expected_text(lora_llm, adapters, name, 12)
    assert len(set(texts.values())) == 3  # each adapter changes the output

    chat = lora_client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert chat.model == "a2"
    assert chat.choices[0].message.content == expected_text(lora_llm, adapters, "a2", 10, chat=True)
    assert_all_blocks_free(lora_llm)
    wait_idle(lora_server)


def test_streaming_through_an_adapter(lora_client, lora_llm, adapters):
    stream = lora_client.completions.create(model="a1", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.model for c in chunks} == {"a1"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(lora_llm, adapters, "a1", 12)
    stream = lora_client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected_text(lora_llm, adapters, "a2", 10, chat=True)


def test_unknown_model_is_404(lora_client):
    with pytest.raises(openai.NotFoundError, match="a9"):
        lora_client.completions.create(model="a9", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="a9"):
        lora_client.chat.completions.create(model="a9", messages=MESSAGES, max_tokens=2)


def test_runtime_load_use_unload(lora_client, lora_llm, lora_server, adapters):
    response = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": adapters["a3"]})
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'a3' added successfully."
    assert [m.id for m in lora_client.models.list().data][-1] == "a3"
    completion = lora_client.completions.create(model="a3", prompt=PROMPT, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert completion.choices[0].text == expected_text(lora_llm, adapters, "a3", 12)

    # Unloaded while a stream runs with it: the stream finishes with the adapter, new requests get a 404.
    stream = lora_client.completions.create(model="a3", prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    first = next(iter(stream))
    response = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'a3' removed successfully."
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected_text(lora_llm, adapters, "a3", 40)
    with pytest.raises(openai.NotFoundError):
        lora_client.completions.create(model="a3", prompt=PROMPT, max_tokens=2)
    assert "a3" not in [m.id for m in lora_client.models.list().data]
    wait_idle(lora_server)
    assert "LoRA adapter 3: its last request ended; dropping it from the engine" in lora_server.output()


def test_runtime_errors(lora_client, lora_server, tiny_chat_model_dir, adapters, tmp_path):
    def error(route: str, body: dict, status: int) -> dict:
        response = post(lora_server, route, body)
        assert response.status_code == status, response.text
        return response.json()["error"]

    duplicate = error("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": adapters["a1"]}, 400)
    assert duplicate["message"] == "The lora adapter 'a1' has already been loaded."
    assert duplicate["type"] == "InvalidUserInput"
    missing = error("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(tmp_path / "nowhere")}, 404)
    assert missing["type"] == "NotFoundError" and "nowhere" in missing["message"]
    # a directory that is no PEFT adapter (the base model's): the engine's reason, a 400
    bad = error("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": tiny_chat_model_dir}, 400)
    assert "adapter_config.json" in bad["message"]
    assert error("/v1/load_lora_adapter", {"lora_name": "b"}, 400)["message"] == \
        "Both 'lora_name' and 'lora_path' must be provided."
    assert error("/v1/unload_lora_adapter", {"lora_name": "zz"}, 404)["message"] == \
        "The lora adapter 'zz' cannot be found."
    assert error("/v1/unload_lora_adapter", {"lora_int_id": 99}, 404)["type"] == "NotFoundError"
    assert error("/v1/unload_lora_adapter", {}, 400)["type"] == "InvalidUserInput"
    assert "b" not in [m.id for m in lora_client.models.list().data]
    # the failures left the engine serving
    assert requests.get(lora_server.url + "/health", timeout=5).status_code == 200
    assert lora_client.completions.create(model="a1", prompt=PROMPT, max_tokens=2).choices[0].text


def test_lora_requests_info_metric(lora_client, lora_server):
    from prometheus_client.parser import text_string_to_metric_families

    def sample():
        text = requests.get(lora_server.url + "/metrics", timeout=5).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "vllm:lora_requests_info"]
        assert len(samples) == 1
        return samples[0]

    stream = lora_client.completions.create(model="a1", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    deadline = time.monotonic() + 10
    while (running := sample()).labels["running_lora_adapters"] != "a1" and time.monotonic() < deadline:
        time.sleep(0.01)  # the engine thread refreshes its readings every 20 ms while busy
    stream.close()
    assert running.labels == {"max_lora": "2", "running_lora_adapters": "a1", "waiting_lora_adapters": ""}
    assert running.value > 1e9  # the time of the reading, as vLLM's
    wait_idle(lora_server)
    assert sample().labels["running_lora_adapters"] == ""


def test_runtime_updating_is_off_by_default(tiny_server):
    response = requests.post(tiny_server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"},
                             headers={"Authorization": "Bearer test-key-123"}, timeout=10)
    assert response.status_code == 404


def serve_fails(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args, "--port", "0"],
                            capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                            env={**__import__("os").environ, "PAGODA_CPU_THREADS": "1"})
    assert result.returncode != 0
    return result.stderr + result.stdout


@pytest.mark.parametrize("case", ["no-enable", "syntax", "bad-path", "bad-base"])
def test_bad_lora_modules_fail_at_start(tiny_chat_model_dir, adapters, tmp_path, case):
    args = {"no-enable": ["--lora-modules", f"a1={adapters['a1']}"],
            "syntax": [*LORA_ARGS, "--lora-modules", adapters["a1"]],
            "bad-path": [*LORA_ARGS, "--lora-modules", f"bad={tmp_path / 'nowhere'}"],
            "bad-base": [*LORA_ARGS, "--lora-modules", json.dumps({"name": "a1", "path": adapters["a1"],
                                                                  "base_model_name": "other"})]}[case]
    output = serve_fails([tiny_chat_model_dir, *TINY_ARGS, *args])
    expected = {"no-enable": "--lora-modules needs --enable-lora", "syntax": "must be name=path or JSON",
                "bad-path": "--lora-modules bad=", "bad-base": "base_model_name 'other'"}[case]
    assert expected in output, output


def test_bench_serve_spreads_requests_over_adapters(lora_server, tmp_path, capsys):
    from pagoda.entrypoints.cli import main as cli_main

    out = tmp_path / "bench.json"
    args = ["bench", "serve", "--base-url", lora_server.url, "--random-input-len", "8", "--random-output-len", "4",
            "--num-prompts", "4", "--ignore-eos", "--disable-tqdm", "--output-json", str(out)]
    assert cli_main([*args, "--lora-modules", "a1", "a2"]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    capsys.readouterr()
    assert cli_main([*args, "--lora-modules", "zz"]) != 0  # the requests name the adapters, not the base model
    assert "HTTP 404" in capsys.readouterr().err
