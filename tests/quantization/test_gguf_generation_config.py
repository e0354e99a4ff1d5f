"""Sampling defaults as vLLM's ``--generation-config`` finds them: GGUF's ``general.sampling.*`` keys, a
``generation_config.json`` beside the weights (which wins), pagoda's settings for the bundled model (which carries
neither), none with ``vllm``, and ``override_generation_config`` over all."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pagoda.core.generation_config import read_generation_config
from pagoda.core.model_files import BUNDLED_GENERATION_CONFIG, bundled_model_path
from pagoda.quantization.gguf import GGUFCheckpoint

SAMPLING = {"general.sampling.temp": 0.6, "general.sampling.top_k": 30, "general.sampling.top_p": 0.9,
            "general.sampling.min_p": 0.05, "general.sampling.penalty_repeat": 1.1,
            "general.sampling.mirostat": 2}  # no counterpart here: ignored


def _config(path: str, weight_file: str | None, choice: str = "auto", override: dict | None = None):
    return SimpleNamespace(path=path, weight_file=weight_file, generation_config=choice,
                           checkpoint_format=GGUFCheckpoint if weight_file else None,
                           override_generation_config=override or {})


@pytest.fixture
def sampling_gguf(write_gguf):
    return write_gguf("sampling.gguf", "llama", SAMPLING, {"token_embd.weight": np.zeros((8, 32), np.float32)})


def test_gguf_sampling_keys_become_generation_config(sampling_gguf):
    expected = {"temperature": 0.6, "top_k": 30, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1}
    got = GGUFCheckpoint.load_generation_config(sampling_gguf)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())  # float32 in the file
    assert read_generation_config(_config(sampling_gguf, sampling_gguf))["top_k"] == 30


def test_a_generation_config_json_beside_the_gguf_wins(sampling_gguf, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "max_new_tokens": 64}))
    values = read_generation_config(_config(str(tmp_path), sampling_gguf))
    assert values["temperature"] == 0.3 and values["max_new_tokens"] == 64 and values["top_k"] == 30
    assert read_generation_config(_config(str(tmp_path), sampling_gguf, "vllm")) == {}
    override = read_generation_config(_config(str(tmp_path), sampling_gguf, override={"temperature": 0.9}))
    assert override["temperature"] == 0.9


def test_the_bundled_model_gets_its_documented_defaults():
    bundled = bundled_model_path()
    assert read_generation_config(_config(bundled, bundled)) == BUNDLED_GENERATION_CONFIG
    assert read_generation_config(_config(bundled, bundled, "vllm")) == {}
    with_override = read_generation_config(_config(bundled, bundled, override={"temperature": 0.0}))
    assert with_override == {**BUNDLED_GENERATION_CONFIG, "temperature": 0.0}
