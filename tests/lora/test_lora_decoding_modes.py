"""Adapters through the engine's other decoding paths: forked samples (n > 1), beam search and n-gram
speculative decoding keep their request's adapter (children, beams and verified drafts alike)."""

from __future__ import annotations

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from pagoda.sampling_params import BeamSearchParams
from tests.conftest import assert_all_blocks_free
from tests.lora.conftest import peft_greedy

PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8]


def _llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", enable_lora=True, max_loras=2, skip_tokenizer_init=True,
               max_model_len=128, num_gpu_blocks_override=64, **kwargs)


def test_forks_and_beams_keep_the_adapter(tiny_model_dir, lora_adapters):
    base, path = tiny_model_dir("llama"), lora_adapters("llama", "a")
    lora = LoRARequest("a", 1, path)
    expected = peft_greedy(base, path, [PROMPT], 6)[0]
    llm = _llm(base)
    # top_k=1 samples the argmax: each forked sample must follow the adapter's greedy path
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=6,
                                                                        ignore_eos=True),
                       use_tqdm=False, lora_request=lora)[0]
    assert [list(c.token_ids) for c in out.outputs] == [expected, expected]
    beams = llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True),
                            lora_request=lora)[0]
    base_beams = llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True))[0]
    assert beams.sequences[0].tokens != base_beams.sequences[0].tokens
    assert_all_blocks_free(llm)


def test_ngram_speculative_decoding_with_an_adapter(tiny_model_dir, lora_adapters):
    base, path = tiny_model_dir("llama"), lora_adapters("llama", "a")
    llm = _llm(base, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                         "prompt_lookup_min": 1})
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:6]}]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[LoRARequest("a", 1, path), None])
    assert list(outs[0].outputs[0].token_ids) == peft_greedy(base, path, [PROMPT], 10)[0]
    assert list(outs[1].outputs[0].token_ids) == peft_greedy(base, None, [PROMPT[:6]], 10)[0]
    assert_all_blocks_free(llm)
