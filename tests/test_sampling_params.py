"""SamplingParams: vLLM's defaults, normalisation, validation messages and generation-config defaults."""

from __future__ import annotations

import pytest

from pagoda.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    SamplingType,
    default_sampling_kwargs,
)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.sampling_type is SamplingType.RANDOM


def test_keyword_construction_repr_and_clone():
    p = SamplingParams(temperature=0.8, top_p=0.95, stop="###", logit_bias={"42": 150})
    assert repr(p) == "SamplingParams(temperature=0.8, top_p=0.95, stop=['###'], logit_bias={42: 100.0})"
    q = p.clone()
    q.stop.append("x")
    q.logit_bias[7] = 1.0
    assert p.stop == ["###"] and p.logit_bias == {42: 100.0}


def test_sampling_type_and_greedy_normalisation():
    assert SamplingParams(temperature=0.0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.5, seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.5, seed=-1).seed is None
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    # Tiny non-zero temperatures are raised to 0.01 so logits / T stays finite.
    assert SamplingParams(temperature=1e-3).temperature == 0.01
    assert SamplingParams(top_k=-1).top_k == -1 and not SamplingParams(top_k=-1).uses_top_k


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be an integer >= 1, got 0"),
        (dict(n=3, best_of=2), "best_of must be an integer >= n (3), got 2"),
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
        (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2], got -3.0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero, got 0.0"),
        (dict(temperature=-1.0), "temperature must be non-negative, got -1.0"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_k=-2), "top_k must be 0 or -1 (disabled) or an integer >= 1, got -2"),
        (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
        (dict(seed="7"), "seed must be an integer or None, got '7'"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1 or None, got 0"),
        (dict(min_tokens=-1), "min_tokens must be an integer >= 0, got -1"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens must be <= max_tokens (10), got 20"),
        (dict(logprobs=-2), "logprobs must be None, -1 (whole vocabulary) or an integer >= 0, got -2"),
        (dict(prompt_logprobs=-5), "prompt_logprobs must be None, -1 (whole vocabulary) or an integer >= 0"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be None, -1 (the model's limit)"),
        (dict(stop=["a", ""]), "stop must contain only non-empty strings"),
        (dict(stop="x", detokenize=False), "stop strings need detokenize=True"),
        (dict(stop_token_ids=[1, "2"]), "stop_token_ids must contain only integers"),
        (dict(bad_words=[""]), "bad_words must contain only non-empty strings"),
        (dict(allowed_token_ids=[]), "allowed_token_ids must be None or a non-empty list"),
        (dict(allowed_token_ids=[1.5]), "allowed_token_ids must contain only integers"),
        (dict(logit_bias={"abc": 1.0}), "logit_bias keys must be token ids (integers), got 'abc'"),
        (dict(logit_bias={1: "big"}), "logit_bias values must be numbers, got 'big' for token 1"),
        (dict(temperature=0.0, n=2), "n must be 1 when using greedy sampling (temperature=0), got 2"),
        (dict(temperature=0.0, best_of=3), "best_of must be 1 when using greedy sampling (temperature=0), got 3"),
        (dict(output_kind=7), "7 is not a valid RequestOutputKind"),
    ],
)
def test_validation_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_accepted_edge_values():
    SamplingParams(logprobs=-1, prompt_logprobs=0, max_tokens=None, min_tokens=5, truncate_prompt_tokens=-1)
    SamplingParams(n=2, best_of=4, top_p=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0)
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_verify_token_ids_against_vocab():
    SamplingParams(logit_bias={0: 1.0}, allowed_token_ids=[9]).verify_token_ids(10)
    with pytest.raises(ValueError, match=r"allowed_token_ids has token ids outside the vocabulary \[0, 10\): \[10\]"):
        SamplingParams(allowed_token_ids=[3, 10]).verify_token_ids(10)
    with pytest.raises(ValueError, match=r"logit_bias has token ids outside the vocabulary \[0, 10\): \[-1\]"):
        SamplingParams(logit_bias={-1: 1.0}).verify_token_ids(10)


def test_generation_config_defaults_and_overrides():
    config = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64, "do_sample": True,
              "repetition_penalty": 1.1, "min_p": None, "eos_token_id": [2, 7]}
    assert default_sampling_kwargs(config) == dict(temperature=0.6, top_p=0.9, top_k=20, max_tokens=64,
                                                   repetition_penalty=1.1)
    p = SamplingParams.from_generation_config(config, temperature=0.0, max_tokens=5)
    assert (p.temperature, p.max_tokens, p.top_k, p.top_p, p.repetition_penalty) == (0.0, 5, 0, 1.0, 1.1)
    assert SamplingParams.from_generation_config(None) == SamplingParams()


def test_update_from_generation_config_adds_extra_eos_ids():
    p = SamplingParams(stop_token_ids=[5], min_tokens=2)
    p.update_from_generation_config({"eos_token_id": [2, 7, 9]}, model_eos_token_id=2)
    assert p.stop_token_ids == [5, 7, 9]
    assert p.all_stop_token_ids == {2, 5, 7, 9}
    ignoring = SamplingParams(ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": 7}, model_eos_token_id=2)
    assert ignoring.stop_token_ids == [] and ignoring.all_stop_token_ids == {2, 7}
