"""The pooling half of the LLM API: task resolution and task errors, prompt forms, input order under batching,
truncation, score pairing rules and the parameters each call accepts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda import LLM, SamplingParams
from pagoda.outputs import ClassificationRequestOutput, EmbeddingRequestOutput, ScoringRequestOutput
from pagoda.pooling_params import PoolingParams
from tests.conftest import assert_all_blocks_free
from tests.models.test_pooling_models import make_llm, minilm_dir, pooling_model_dir  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def embedder():
    return make_llm(minilm_dir())


def test_prompt_forms_order_and_truncation(embedder):
    tokenizer = embedder.get_tokenizer()
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]  # more prompts than max_num_seqs
    outputs = embedder.embed(texts)  # with the progress bar
    assert all(isinstance(o, EmbeddingRequestOutput) for o in outputs)
    assert [o.prompt for o in outputs] == texts
    assert [o.prompt_token_ids for o in outputs] == [tokenizer.encode(t) for t in texts]
    by_ids = embedder.embed([{"prompt_token_ids": tokenizer.encode(t)} for t in texts[:3]], use_tqdm=False)
    by_list = embedder.embed(tokenizer.encode(texts[0]), use_tqdm=False)
    for a, b in zip(by_ids + by_list, outputs[:3] + outputs[:1]):
        torch.testing.assert_close(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding),
                                   atol=1e-5, rtol=0)
    truncated = embedder.embed(texts[6], truncate_prompt_tokens=3, use_tqdm=False)[0]
    assert truncated.prompt_token_ids == tokenizer.encode(texts[6])[-3:]
    assert_all_blocks_free(embedder)


def test_bi_encoder_score_pairing(embedder):
    texts_1, texts_2 = ["a cat sits on the mat", "stock markets fell"], ["a kitten on a rug", "shares dropped"]
    embeddings = torch.tensor([o.outputs.embedding for o in embedder.embed(texts_1 + texts_2, use_tqdm=False)])
    elementwise = embedder.score(texts_1, texts_2, use_tqdm=False)
    assert all(isinstance(o, ScoringRequestOutput) for o in elementwise)
    want = F.cosine_similarity(embeddings[:2], embeddings[2:], dim=-1)
    assert [o.outputs.score for o in elementwise] == pytest.approx(want.tolist(), abs=1e-5)
    broadcast = embedder.score(texts_1[0], texts_2, use_tqdm=False)
    want = F.cosine_similarity(embeddings[:1], embeddings[2:], dim=-1)
    assert [o.outputs.score for o in broadcast] == pytest.approx(want.tolist(), abs=1e-5)
    assert len(embedder.score([texts_1[0]], texts_2[0], use_tqdm=False)) == 1
    with pytest.raises(ValueError, match="text_1 and text_2 must pair 1:1, 1:N or N:N; got 2 and 3"):
        embedder.score(texts_1, texts_2 + ["x"])
    with pytest.raises(ValueError, match="text_2: give at least one text"):
        embedder.score(texts_1, [])


def test_calls_the_model_cannot_serve_are_clear_errors(embedder):
    with pytest.raises(ValueError, match=r"LLM.classify: this model was loaded for the 'embed' task"):
        embedder.classify("hello")
    with pytest.raises(ValueError, match="serves the 'embed' task, not text generation"):
        embedder.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="task: BertModel can't do 'classify'; it supports embed"):
        make_llm(minilm_dir(), task="classify")
    with pytest.raises(ValueError, match="task must be one of"):
        PoolingParams(task="rank")
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)
    assert_all_blocks_free(embedder)  # nothing half-added


def test_pooling_calls_on_a_generation_model(tiny_model_dir):
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="task: LlamaForCausalLM can't do 'reward'; it supports generate; "
                                         "converted to a pooling model: embed, classify, score"):
        LLM(path, task="reward", dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24)
    for call in ("embed", "classify", "encode"):
        with pytest.raises(ValueError, match=f"LLM.{call}: this model was loaded for text generation"):
            getattr(llm, call)([[5, 6, 7]])
    with pytest.raises(ValueError, match="LLM.score: this model was loaded for text generation"):
        llm.score("a", "b")


def test_classifier_calls_and_options(pooling_model_dir):  # noqa: F811 (fixture)
    llm = make_llm(pooling_model_dir("qwen2-cls"), task="classify")
    outputs = llm.classify(["one", "two two", "three three three"], use_tqdm=False)
    assert all(isinstance(o, ClassificationRequestOutput) for o in outputs)
    assert [sum(o.outputs.probs) for o in outputs] == pytest.approx([1.0] * 3, abs=1e-5)
    raw = llm.encode("one", use_tqdm=False)[0]
    assert raw.outputs.data.shape == (3,)
    torch.testing.assert_close(raw.outputs.data, torch.tensor(outputs[0].outputs.probs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="LLM.embed: this model was loaded for the 'classify' task"):
        llm.embed("one")
    with pytest.raises(ValueError, match="dimensions: not an option of the 'classify' task"):
        llm.classify("one", PoolingParams(dimensions=2))
    with pytest.raises(ValueError, match="pooling_params: got 2 for 1 prompts"):
        llm.classify(["one"], [PoolingParams(), PoolingParams()])


def test_token_type_ids_follow_truncation_and_must_match_the_prompt(pooling_model_dir):  # noqa: F811 (fixture)
    llm = make_llm(pooling_model_dir("bert"))
    tokenizer = llm.get_tokenizer()
    encoded = tokenizer("a question", text_pair="an answer with several words")
    prompt = {"prompt_token_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"]}
    truncated = llm.classify(prompt, truncate_prompt_tokens=4, use_tqdm=False)[0]
    want = llm.classify({"prompt_token_ids": encoded["input_ids"][-4:],
                         "token_type_ids": encoded["token_type_ids"][-4:]}, use_tqdm=False)[0]
    assert truncated.outputs.probs == pytest.approx(want.outputs.probs, abs=1e-6)
    without_types = llm.classify({"prompt_token_ids": encoded["input_ids"][-4:]}, use_tqdm=False)[0]
    assert without_types.outputs.probs != pytest.approx(want.outputs.probs, abs=1e-4)  # the types matter
    with pytest.raises(ValueError, match="token_type_ids: 3 ids for a prompt of"):
        llm.classify({"prompt_token_ids": encoded["input_ids"], "token_type_ids": [0, 0, 1]})
    assert_all_blocks_free(llm)
