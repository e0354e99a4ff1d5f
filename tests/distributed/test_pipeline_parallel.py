"""Pipeline parallelism through the real engine: two stages (spawned ranks) give exactly the single-process
engine's tokens in float32 — mixed prompt lengths, chunked prefill, a KV cache small enough to preempt, seeded
``n=2`` sampling, logprobs and prompt logprobs — on a 4-layer Llama (the default split and an uneven
``VLLM_PP_LAYER_PARTITION``), a post-norm OPT with projected embeddings, GPT-2 and a Gemma 2; and the layer split
and the configurations pipeline parallelism refuses, in-process."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.core.config import EngineConfig
from pagoda.core.engine_args import EngineArgs
from pagoda.distributed.pipeline import PARTITION_ENV, even_partition, get_pp_indices, layer_partition
from pagoda.utils import environ_set
from tests.distributed.pp_spawn import BACKEND, run_engine_ranks

MAX_TOKENS = 12
LOGPROB_ATOL = 1e-4
#: Chunked prefill (7-token steps) and a 12-block cache that the batch below overflows (preemption).
SMALL_STEPS_AND_CACHE = dict(max_num_batched_tokens=7, max_num_seqs=4, num_gpu_blocks_override=12, block_size=8)


def _prompts(seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    """Lone prompts of 1, 5, 17 and 40 tokens and three sharing a 33-token prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(33)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 40)] + [shared + [5], shared + [6, 7],
                                                                                    shared]


GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
GREEDY_LOGPROBS = dict(GREEDY, logprobs=2, prompt_logprobs=2)
SEEDED_N2 = dict(temperature=0.9, top_p=0.9, n=2, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)


def _logprob_dicts(steps) -> list[dict[int, float]] | None:
    return None if steps is None else [None if s is None else {t: lp.logprob for t, lp in s.items()} for s in steps]


def generate_scenarios(scenarios: list[dict]) -> list[dict]:
    """Run each scenario (``model``, ``env``, ``engine`` kwargs, ``requests``: (prompts, SamplingParams kwargs)
    pairs) in an LLM of its own; returns plain data: per request, its samples' tokens and logprobs and its prompt
    logprobs, and the engine's preemption count."""
    results = []
    for scenario in scenarios:
        with environ_set(scenario.get("env", {})):
            llm = LLM(scenario["model"], dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24,
                      seed=0, **scenario["engine"])
            outputs = []
            for prompts, params in scenario["requests"]:
                done = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params),
                                    use_tqdm=False)
                outputs.append([{"samples": [(list(c.token_ids), _logprob_dicts(c.logprobs)) for c in o.outputs],
                                 "prompt_logprobs": _logprob_dicts(o.prompt_logprobs)} for o in done])
            runner = llm.llm_engine.runner  # None under executors whose workers live elsewhere
            results.append({"outputs": outputs, "preemptions": llm.llm_engine.get_stats().num_preemptions_total,
                            "kv_caches": None if runner is None else len(runner.kv_caches),
                            "weights": None if runner is None else sum(p.numel() for p in runner.model.parameters())})
            del llm
    return results


def _tiny_dirs(tiny_model_dir) -> dict[str, str]:
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, OPTConfig

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=1024,
                  max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    return {
        "llama": tiny_model_dir("pp_llama4", LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2,
                                                         tie_word_embeddings=False)),
        # post-norm layers (no residual handed over), embeddings narrower than the layers, tied LM head
        "opt": tiny_model_dir("pp_opt4", OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=32,
                                                   do_layer_norm_before=False, pad_token_id=0)),
        "gpt2": tiny_model_dir("pp_gpt2_4", GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=1024,
                                                       vocab_size=1024, bos_token_id=1, eos_token_id=2)),
        # sliding-window and global layers alternating, soft-capping, tied LM head
        "gemma2": tiny_model_dir("pp_gemma2_4", Gemma2Config(**common, intermediate_size=128, num_key_value_heads=2,
                                                             head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                                             final_logit_softcapping=5.0, pad_token_id=0)),
    }


@pytest.fixture(scope="module")
def pipeline_runs(tiny_model_dir):
    """Every scenario once with two pipeline stages (rank by rank) and once in a single process."""
    dirs = _tiny_dirs(tiny_model_dir)
    prompts = _prompts()
    scenarios = [
        {"name": "llama", "model": dirs["llama"], "engine": SMALL_STEPS_AND_CACHE,
         "requests": [(prompts, GREEDY_LOGPROBS), (prompts[:4], SEEDED_N2)]},
        {"name": "llama_uneven", "model": dirs["llama"], "env": {PARTITION_ENV: "1,3"}, "engine": {},
         "requests": [(prompts, GREEDY)]},
        {"name": "opt", "model": dirs["opt"], "engine": {}, "requests": [(prompts, GREEDY)]},
        {"name": "gpt2", "model": dirs["gpt2"], "engine": {}, "requests": [(prompts, GREEDY)]},
        {"name": "gemma2", "model": dirs["gemma2"], "engine": {}, "requests": [(prompts, GREEDY)]},
    ]
    pp = [dict(s, engine={**s["engine"], "pipeline_parallel_size": 2, "distributed_executor_backend": BACKEND})
          for s in scenarios]
    by_rank = run_engine_ranks(generate_scenarios, pp, world_size=2)
    single = generate_scenarios(scenarios)
    return {s["name"]: ([rank[i] for rank in by_rank], single[i]) for i, s in enumerate(scenarios)}


def _tokens(result) -> list[list[list[int]]]:
    return [[[tokens for tokens, _ in req["samples"]] for req in batch] for batch in result["outputs"]]


def _assert_logprobs_close(got, want) -> None:
    assert (got is None) == (want is None)
    if got is None:
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        assert g.keys() == w.keys()
        for token in g:
            assert abs(g[token] - w[token]) <= LOGPROB_ATOL, (token, g[token], w[token])


@pytest.mark.parametrize("name", ["llama", "llama_uneven", "opt", "gpt2", "gemma2"])
def test_two_stages_give_the_single_process_tokens(pipeline_runs, name):
    ranks, single = pipeline_runs[name]
    assert _tokens(ranks[0]) == _tokens(single)
    # Every rank reports the step's output (the first stage records what the last one sampled).
    assert all(_tokens(rank) == _tokens(single) for rank in ranks)


def test_each_stage_holds_its_own_layers(pipeline_runs):
    if BACKEND != "external_launcher":
        pytest.skip("the runners live in the workers")
    assert [rank["kv_caches"] for rank in pipeline_runs["llama"][0]] == [2, 2]
    assert [rank["kv_caches"] for rank in pipeline_runs["llama_uneven"][0]] == [1, 3]
    for name in ("llama", "llama_uneven", "opt", "gpt2", "gemma2"):
        ranks, single = pipeline_runs[name]
        assert all(rank["weights"] < single["weights"] for rank in ranks)


def test_chunked_prefill_preemption_sampling_and_logprobs(pipeline_runs):
    ranks, single = pipeline_runs["llama"]
    assert single["preemptions"] > 0 and ranks[0]["preemptions"] > 0, "the small cache was meant to preempt"
    greedy, seeded = ranks[0]["outputs"]
    assert all(len(req["samples"]) == 2 for req in seeded)  # n=2: both samples, the same as one process draws
    for got, want in zip(greedy, single["outputs"][0]):
        _assert_logprobs_close(got["prompt_logprobs"], want["prompt_logprobs"])
        _assert_logprobs_close(got["samples"][0][1], want["samples"][0][1])


# ---------------------------------------------------------------------------------------------- in-process checks
def test_even_split_puts_the_remainder_before_the_last_stage():
    assert even_partition(4, 2) == [2, 2]
    assert even_partition(5, 2) == [3, 2]
    assert even_partition(7, 3) == [2, 3, 2]
    assert even_partition(10, 4) == [2, 3, 3, 2]
    assert [get_pp_indices(7, r, 3) for r in range(3)] == [(0, 2), (2, 5), (5, 7)]


def test_layer_partition_env(monkeypatch):
    monkeypatch.setenv(PARTITION_ENV, "1,3")
    assert layer_partition(4, 2) == [1, 3]
    assert [get_pp_indices(4, r, 2) for r in range(2)] == [(0, 1), (1, 4)]
    for bad in ("2,3", "4", "1,1,2", "a,b", "5,-1"):
        monkeypatch.setenv(PARTITION_ENV, bad)
        with pytest.raises(ValueError, match=PARTITION_ENV):
            layer_partition(4, 2)


def _config(path: str, **kwargs) -> EngineConfig:
    return EngineConfig.from_engine_args(EngineArgs(model=path, dtype="float32", skip_tokenizer_init=True,
                                                    pipeline_parallel_size=2, **kwargs))


def test_refused_configurations(tiny_model_dir, monkeypatch):
    path = _tiny_dirs(tiny_model_dir)["llama"]
    _config(path)  # the default split of 4 layers is fine
    monkeypatch.setenv(PARTITION_ENV, "3,3")
    with pytest.raises(ValueError, match=PARTITION_ENV):
        _config(path)
    monkeypatch.delenv(PARTITION_ENV)
    with pytest.raises(ValueError, match="speculative_config and pipeline_parallel_size"):
        _config(path, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="enable_lora and pipeline_parallel_size"):
        _config(path, enable_lora=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2: pipeline parallelism runs text generation"):
        _config(path, task="embed")
    from pagoda.core.pipeline_step import check_pipeline_config
    from pagoda.models.interface import PagodaModel

    with pytest.raises(ValueError, match="the PagodaModel architecture can't be split into pipeline stages"):
        check_pipeline_config(_config(path), PagodaModel)  # a class that doesn't declare supports_pp
    with pytest.raises(ValueError, match="pipeline_parallel_size=8 is larger than the model's 4 layers"):
        EngineConfig.from_engine_args(EngineArgs(model=path, dtype="float32", skip_tokenizer_init=True,
                                                 pipeline_parallel_size=8))


def test_the_single_process_model_builds_every_layer(tiny_model_dir):
    """Without pipeline parallelism nothing is a placeholder and the fused-decode hook is untouched."""
    from pagoda.distributed.pipeline import PPMissingLayer

    llm = LLM(_tiny_dirs(tiny_model_dir)["llama"], dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_bytes=1 << 24)
    model = llm.llm_engine.runner.model
    assert not any(isinstance(m, PPMissingLayer) for m in model.modules())
    assert llm.llm_engine.runner.pipeline is None
    assert len(llm.llm_engine.runner.kv_caches) == 4
