"""Beam search equals transformers' ``generate(num_beams=w, do_sample=False, num_return_sequences=w)`` sequence
for sequence, on tiny random models in float32 — with and without EOS, for several widths, length penalties and
``early_stopping`` values, for a batch of prompts, and when the engine chunks prefills or preempts beam groups —
and every KV block comes back afterwards."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.sampling_params import BeamSearchParams
from tests.conftest import _hf_model, assert_all_blocks_free

MAX_TOKENS = 10
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0)


def _prompts(seed: int, count: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(2, 20))] for _ in range(count)]


EOS_PROMPTS = _prompts(7, 1) + _prompts(11, 2)
EOS_BOOST = 1.3


def hf_beam_search(model_dir: str, prompt: list[int], params: BeamSearchParams, eos_token_id: int | None):
    """transformers' beams for ``prompt``: ``[(generated tokens, score)]``, best first. Sequences that ended
    with EOS are cut after it (transformers pads them)."""
    model = _hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=params.beam_width, num_return_sequences=params.beam_width, do_sample=False,
                             max_new_tokens=params.max_tokens, length_penalty=params.length_penalty,
                             early_stopping=params.early_stopping, pad_token_id=0,
                             eos_token_id=eos_token_id if eos_token_id is not None else -1,
                             output_scores=True, return_dict_in_generate=True)
    beams = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        generated = sequence[len(prompt):]
        if eos_token_id is not None and eos_token_id in generated:
            generated = generated[:generated.index(eos_token_id) + 1]
        beams.append((generated, score))
    return beams


def assert_same_beams(output, prompt: list[int], expected, params: BeamSearchParams, eos: int | None) -> None:
    got = [seq.tokens[len(prompt):] for seq in output.sequences]
    assert got == [tokens for tokens, _ in expected]
    for seq, (tokens, score) in zip(output.sequences, expected):
        assert seq.tokens[:len(prompt)] == prompt
        ours = seq.cum_logprob / len(tokens) ** params.length_penalty
        assert ours == pytest.approx(score, abs=1e-4)
        ended = eos is not None and tokens[-1] == eos
        assert seq.finish_reason == ("stop" if ended else "length")
        assert len(seq.logprobs) == len(tokens)
        assert all(token in position for token, position in zip(tokens, seq.logprobs))
        assert sum(position[token].logprob for token, position in zip(tokens, seq.logprobs)) == \
            pytest.approx(seq.cum_logprob, abs=1e-4)


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, tmp_path_factory):
    """``(path, eos, LLM)``: the tiny Llama with an EOS id that beam search meets often — the token
    transformers' beams (found once with EOS disabled) take most often for the test prompts, made likelier."""
    source = tiny_model_dir("llama")
    counts: dict[int, int] = {}
    for prompt in EOS_PROMPTS:
        for tokens, _ in hf_beam_search(source, prompt, BeamSearchParams(beam_width=4, max_tokens=6), None):
            for token in tokens:
                counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=lambda token: (counts[token], -token))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():  # a likelier EOS, so that sequences ending with it make the final beams
        model.lm_head.weight[eos] *= EOS_BOOST
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    target = tmp_path_factory.mktemp("tiny_llama_eos")
    model.save_pretrained(target)
    return str(target), eos, LLM(str(target), **ENGINE)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    path = tiny_model_dir("llama")
    return path, LLM(path, **ENGINE)


@pytest.mark.parametrize("width", [2, 3, 5])
def test_ignore_eos_matches_transformers(llama, width):
    path, llm = llama
    _check_ignore_eos(path, llm, width)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_ignore_eos_matches_transformers_other_models(tiny_model_dir, kind):
    path = tiny_model_dir(kind)
    _check_ignore_eos(path, LLM(path, **ENGINE), 4)


def _check_ignore_eos(path: str, llm: LLM, width: int) -> None:
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = _prompts(width)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        assert_same_beams(output, prompt, hf_beam_search(path, prompt, params, None), params, None)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("width,length_penalty,early_stopping", [
    (2, 1.0, False), (4, 1.0, False), (4, 0.0, False), (4, 2.0, False), (4, -1.0, False),
    (3, 1.0, True), (4, 1.5, "never"), (4, 0.5, True),
])
def test_eos_matches_transformers(eos_model, width, length_penalty, early_stopping):
    path, eos, llm = eos_model
    assert eos in llm.llm_engine.eos_token_ids
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    prompts = EOS_PROMPTS
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finished_with_eos = 0
    for prompt, output in zip(prompts, outputs):
        expected = hf_beam_search(path, prompt, params, eos)
        assert_same_beams(output, prompt, expected, params, eos)
        finished_with_eos += sum(seq.finish_reason == "stop" for seq in output.sequences)
    if length_penalty <= 1.0:  # (a penalty above 1 favours the long sequences: those that end early lose)
        assert finished_with_eos > 0  # sequences that ended with EOS are among those returned
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("engine_args", [
    {"max_num_batched_tokens": 6, "max_num_seqs": 4},  # chunked prefill; groups wait for budget
    {"num_gpu_blocks_override": 12, "block_size": 4},  # groups preempted and recomputed
    # without the prefix cache a recomputed group no longer shares its prompt blocks: it needs more room
    {"enable_prefix_caching": False, "block_size": 4, "num_gpu_blocks_override": 30},
], ids=["chunked_prefill", "preemption", "preemption_no_prefix_cache"])
def test_batch_shapes_and_neighbours_do_not_change_beams(tiny_model_dir, engine_args):
    """Several beam groups and ordinary requests share the steps; the beams still equal transformers'."""
    path = tiny_model_dir("llama")
    llm = LLM(path, **{**ENGINE, **engine_args})
    engine = llm.llm_engine
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = _prompts(3, 3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"beam-{i}", {"prompt_token_ids": prompt}, params)
        engine.add_request(f"greedy-{i}", {"prompt_token_ids": prompt[::-1]},
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    for i, prompt in enumerate(prompts):
        expected = hf_beam_search(path, prompt, params, None)
        assert [c.token_ids for c in finished[f"beam-{i}"].outputs] == [tokens for tokens, _ in expected]
        assert len(finished[f"greedy-{i}"].outputs[0].token_ids) == MAX_TOKENS
    if "num_gpu_blocks_override" in engine_args:
        assert engine.scheduler.num_preemptions_total > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("width,max_tokens", [(4, 1), (2, 2), (3, 3)])
def test_edge_widths_and_lengths_match_transformers(eos_model, width, max_tokens):
    path, eos, llm = eos_model
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens)
    prompts = EOS_PROMPTS[:2]
    for prompt, output in zip(prompts, llm.beam_search(prompts, params)):
        assert_same_beams(output, prompt, hf_beam_search(path, prompt, params, eos), params, eos)
    assert_all_blocks_free(llm)


def test_beams_share_blocks_and_free_them_at_once(tiny_model_dir):
    """After every step the cache holds exactly the live beams' blocks: the prompt's full blocks once, shared by
    every beam, and no block of a beam that dropped out."""
    llm = LLM(tiny_model_dir("llama"), **{**ENGINE, "block_size": 4})
    engine, kv = llm.llm_engine, llm.llm_engine.kv_cache
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks and a partial one
    engine.add_request("beams", {"prompt_token_ids": prompt},
                       BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        beams = engine.beam_search.groups["beams"].beams if "beams" in engine.beam_search.groups else []
        assert set(kv.req_blocks) == {beam.request_id for beam in beams}
        live = {id(block): block for beam in beams for block in kv.req_blocks[beam.request_id]}
        assert kv.pool.num_blocks - kv.pool.num_free_blocks == len(live)  # nothing else is held
        if len(beams) == 4:
            prompt_blocks = [kv.req_blocks[beam.request_id][:3] for beam in beams]
            assert all(blocks == prompt_blocks[0] for blocks in prompt_blocks)
            assert all(block.ref_cnt == 4 for block in prompt_blocks[0])
    assert steps == 12
    assert_all_blocks_free(llm)


def test_prompt_forms_and_abort(llama):
    path, llm = llama
    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    prompt = _prompts(5, 1)[0]
    as_ids, as_dict = llm.beam_search([prompt, {"prompt_token_ids": prompt}], params)
    assert [s.tokens for s in as_ids.sequences] == [s.tokens for s in as_dict.sequences]
    engine = llm.llm_engine
    engine.add_request("to-abort", {"prompt_token_ids": prompt}, BeamSearchParams(beam_width=4, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4  # the group's beams run as requests of their own
    engine.abort_request("to-abort")
    engine.step()
    assert_all_blocks_free(llm)


def test_bad_parameters_are_errors(llama):
    _, llm = llama
    for kwargs, field in [({"beam_width": 0}, "beam_width"), ({"max_tokens": 0}, "max_tokens"),
                          ({"temperature": -1.0}, "temperature"), ({"early_stopping": "sometimes"},
                                                                   "early_stopping"),
                          ({"length_penalty": float("nan")}, "length_penalty")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="params"):
        llm.beam_search([[5, 6]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        llm.beam_search([[]], BeamSearchParams(beam_width=2, max_tokens=4))
    assert_all_blocks_free(llm)


def test_beams_that_cannot_run_together_are_an_error(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), **{**ENGINE, "max_num_batched_tokens": 4})
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=5, max_tokens=4))
    assert_all_blocks_free(llm)
