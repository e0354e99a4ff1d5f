"""The pooling endpoints of a live ``pagoda serve``: the ``openai`` client's ``embeddings.create`` on
all-MiniLM-L6-v2 (``--task embed``), ``/score`` and ``/rerank`` on it (cosine) and on a tiny XLM-RoBERTa
cross-encoder, ``/classify`` and ``/pooling``, and the 400s of routes the served task doesn't serve. The
reference is ``pagoda.LLM`` on the same model in this process."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests

from tests.entrypoints.openai.conftest import API_KEY, ServerProcess
from tests.models.test_pooling_models import build_pooling_model, make_llm, minilm_dir

TEXTS = ["The quick brown fox", "jumps over the lazy dog near the river bank", "x"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SERVE_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 24), "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def embed_server():
    server = ServerProcess([minilm_dir(), "--task", "embed", "--served-model-name", "minilm", "--api-key", API_KEY,
                            *SERVE_ARGS])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embed_llm():
    return make_llm(minilm_dir())


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reranker"))
    build_pooling_model("xlm-roberta", path)
    return path


@pytest.fixture(scope="module")
def rerank_server(reranker_dir):
    server = ServerProcess([reranker_dir, "--served-model-name", "reranker", *SERVE_ARGS])
    yield server
    server.stop()


def post(server: ServerProcess, path: str, body: dict) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=AUTH, timeout=60)


def test_openai_client_embeddings_match_llm(embed_server, embed_llm):
    import openai

    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    want = np.array([o.outputs.embedding for o in embed_llm.embed(TEXTS, use_tqdm=False)])
    tokens = sum(len(o.prompt_token_ids) for o in embed_llm.embed(TEXTS, use_tqdm=False))
    # the client asks for base64 by default and decodes it as little-endian float32
    for fmt in ("float", None):
        kwargs = {"encoding_format": fmt} if fmt else {}
        response = client.embeddings.create(model="minilm", input=TEXTS, **kwargs)
        assert [d.index for d in response.data] == [0, 1, 2] and response.model == "minilm"
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), want, atol=1e-5)
        assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    single = client.embeddings.create(model="minilm", input=TEXTS[0], dimensions=32, encoding_format="float")
    vector = np.array(single.data[0].embedding)
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    ids = embed_llm.get_tokenizer().encode(TEXTS[1])
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-5)


def test_embeddings_base64_and_errors(embed_server, embed_llm):
    body = post(embed_server, "/v1/embeddings", {"input": TEXTS[1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, embed_llm.embed(TEXTS[1], use_tqdm=False)[0].outputs.embedding, atol=1e-5)
    cases = [({"input": ""}, 400, "input: must be a non-empty"),
             ({"input": "a", "dimensions": 385}, 400, "dimensions: 385 is larger than the model's embedding size"),
             ({"input": "a", "model": "other"}, 404, "does not exist"),
             ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
             ({"input": [[999999]]}, 400, "out of range")]
    for request, status, message in cases:
        response = post(embed_server, "/v1/embeddings", request)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
    assert requests.post(embed_server.url + "/v1/embeddings", json={"input": "a"}, timeout=30).status_code == 401


def test_routes_of_other_tasks_answer_400_naming_the_task(embed_server):
    for path, request in [("/classify", {"input": "a"}), ("/v1/completions", {"prompt": "a"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})]:
        response = post(embed_server, path, request)
        assert response.status_code == 400, response.text
        assert "serves the 'embed' task" in response.json()["error"]["message"]


def test_bi_encoder_score_and_rerank(embed_server, embed_llm):
    want = [o.outputs.score for o in embed_llm.score(TEXTS[0], TEXTS, use_tqdm=False)]
    scored = post(embed_server, "/score", {"text_1": TEXTS[0], "text_2": TEXTS}).json()
    assert [d["index"] for d in scored["data"]] == [0, 1, 2]
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
    reranked = post(embed_server, "/v1/rerank", {"query": TEXTS[0], "documents": TEXTS}).json()
    assert [r["index"] for r in reranked["results"]] == sorted(range(3), key=lambda i: -want[i])
    assert reranked["results"][0]["document"] == {"text": TEXTS[0]}
    pooled = post(embed_server, "/pooling", {"input": TEXTS[2]}).json()
    assert len(pooled["data"][0]["data"]) == 384


def test_cross_encoder_rerank_and_score(rerank_server, reranker_dir):
    llm = make_llm(reranker_dir)
    query, docs = "What is the capital of France?", ["Paris is in France.", "Bananas", "The capital is Paris", "x"]
    want = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    for path in ("/rerank", "/v1/rerank"):
        response = requests.post(rerank_server.url + path, json={"query": query, "documents": docs, "top_n": 2},
                                 timeout=60).json()
        order = sorted(range(len(docs)), key=lambda i: -want[i])[:2]
        assert [r["index"] for r in response["results"]] == order
        assert [r["relevance_score"] for r in response["results"]] == pytest.approx([want[i] for i in order],
                                                                                      abs=1e-5)
        assert [r["document"]["text"] for r in response["results"]] == [docs[i] for i in order]
        assert response["usage"]["total_tokens"] > 0
    scored = post(rerank_server, "/v1/score", {"text_1": [query] * 4, "text_2": docs}).json()
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
    bad = post(rerank_server, "/score", {"text_1": [query, query], "text_2": docs})
    assert bad.status_code == 400 and "1:1, 1:N or N:N" in bad.json()["error"]["message"]
    classified = post(rerank_server, "/classify", {"input": docs[:2]}).json()
    assert [d["num_classes"] for d in classified["data"]] == [1, 1]
    embeddings = post(rerank_server, "/v1/embeddings", {"input": "a"})
    assert embeddings.status_code == 400 and "serves the 'score' task" in embeddings.json()["error"]["message"]


def test_generation_server_refuses_pooling_routes(tiny_server):
    for path, request in [("/v1/embeddings", {"input": "a"}), ("/rerank", {"query": "a", "documents": ["b"]}),
                          ("/score", {"text_1": "a", "text_2": "b"}), ("/classify", {"input": "a"})]:
        response = post(tiny_server, path, request)
        assert response.status_code == 400, response.text
        assert "serves text generation" in response.json()["error"]["message"]
