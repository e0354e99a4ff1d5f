"""The pooling endpoints of ``pagoda serve`` (vLLM's): ``/v1/embeddings`` (OpenAI's format), ``/score`` and
``/rerank`` (also under ``/v1``; the rerank response is Jina/Cohere's), ``/classify`` and ``/pooling``.

``register_pooling_routes(app, engine, config)`` adds them to the server's app. Each route checks that the
served model's task fits (a 400 naming the task otherwise), turns the body into pooling requests for the shared
:class:`AsyncEngine`, and answers once all of them are pooled. On a pooling model, the generation routes answer
400 naming the task and the route to use instead.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from pagoda.entrypoints.llm_pooling import pair_prompt
from pagoda.entrypoints.openai.protocol import MAX_PROMPTS, ErrorResponse, OpenAIBaseModel, UsageInfo
from pagoda.entrypoints.openai.serving_engine import (APIError, OpenAIServing, engine_error, error_body, rejected,
                                                      run_unless_disconnected)
from pagoda.pooling_params import PoolingParams

Input = str | list[str] | list[int] | list[list[int]]
# the model tasks each route serves (a classifier with one label scores pairs too; its pooler checks that)
_ROUTE_TASKS = {"embed": ("embed",), "score": ("embed", "score", "classify"), "classify": ("classify", "score"),
                "pooling": ("embed", "classify", "score", "reward")}
_TASK_ROUTES = {"embed": "/v1/embeddings", "score": "/score or /rerank", "classify": "/classify",
                "reward": "/pooling"}


# ---------------------------------------------------------------------------- bodies
class PoolingFields(OpenAIBaseModel):
    model: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # -1: the model's maximum length
    user: str | None = None


class EmbeddingRequest(PoolingFields):
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True
    normalize: bool | None = None


class PoolingRequest(EmbeddingRequest):
    pass


class ClassificationRequest(PoolingFields):
    input: Input
    add_special_tokens: bool = True
    activation: bool | None = None


class ScoreRequest(PoolingFields):
    text_1: str | list[str]
    text_2: str | list[str]
    activation: bool | None = None


class RerankRequest(PoolingFields):
    query: str
    documents: list[str]
    top_n: int = Field(default=0, ge=0)  # 0: all documents
    activation: bool | None = None


class EmbeddingData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class ListResponse(BaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Any]
    usage: UsageInfo


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class PoolingData(BaseModel):
    index: int
    object: str = "pooling"
    data: Any


class EmbeddingResponse(ListResponse):
    data: list[EmbeddingData]


class ScoreResponse(ListResponse):
    data: list[ScoreData]


class ClassificationResponse(ListResponse):
    data: list[ClassificationData]


class PoolingResponse(ListResponse):
    data: list[PoolingData]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# ---------------------------------------------------------------------------- handlers
class OpenAIServingPooling(OpenAIServing):
    """Turns pooling bodies into engine requests and pooled outputs into responses."""

    def __init__(self, engine: Any, config: Any, models: Any = None) -> None:
        super().__init__(engine, config, models)
        self.task: str = self.model_config.task
        self.pooler = engine.engine.pooler

    def check_model(self, name: str | None) -> str:
        served, lora = self.resolve_model(name)
        if lora is not None:  # refused rather than pooled by the base model under the adapter's name
            raise APIError(f"model: {name!r} is a LoRA adapter; the pooling routes serve the base model only "
                           f"({', '.join(self.models.served_model_names)})", 400, "model")
        return served

    def check_task(self, route: str, path: str) -> None:
        if self.task in _ROUTE_TASKS[route]:
            return
        if self.task == "generate":
            raise APIError(f"{path}: this server's model serves text generation (task 'generate'); {path} needs a "
                           "pooling model served with --task embed, classify or score", 400)
        raise APIError(f"{path}: this server's model serves the {self.task!r} task; use "
                       f"{_TASK_ROUTES.get(self.task, '/pooling')} (or serve a model with a task {path} takes)", 400)

    def params(self, task: str, truncate: int | None, **options: Any) -> PoolingParams:
        if truncate == -1:
            truncate = self.max_model_len
        try:
            params = PoolingParams(task=task, truncate_prompt_tokens=truncate, **options)
            self.pooler.check(params, task)
        except ValueError as exc:
            raise APIError(str(exc), 400, next((k for k, v in options.items() if v is not None), None)) from exc
        return params

    async def prompts(self, value: Any, add_special_tokens: bool, param: str = "input") -> list[Any]:
        """Engine prompts from an OpenAI ``input``: a string, strings, token ids, or lists of token ids."""
        if isinstance(value, str):
            items: list[Any] = [value]
        elif value and isinstance(value[0], int):
            items = [value]
        else:
            items = list(value)
        if not items or any(len(item) == 0 for item in items):
            raise APIError(f"{param}: must be a non-empty string, list of strings, list of token ids or list of "
                           "token-id lists", 400, param)
        if len(items) > MAX_PROMPTS:
            raise APIError(f"{param}: at most {MAX_PROMPTS} inputs per request, got {len(items)}", 400, param)
        out = []
        for item in items:
            if isinstance(item, str):
                out.append({"prompt": item, "prompt_token_ids": await self.encode(item, add_special_tokens)})
            else:
                self.check_token_ids(item, param)
                out.append(list(item))
        return out

    async def pool(self, raw_request: Request, prefix: str, prompts: list[Any], params: Any) -> list[Any]:
        """Submit the prompts and wait for every pooled output (in input order); aborted if the client leaves."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        group = self.engine.new_group(request_id)
        start = time.monotonic()

        async def work() -> list[Any]:
            try:
                await group.add(prompts, params)
            except ValueError as exc:
                raise rejected(exc) from exc
            results: list[Any] = [None] * len(prompts)
            try:
                async for index, output in group:
                    results[index] = output
            except Exception as exc:  # noqa: BLE001 - engine failures become a 500
                raise engine_error(exc) from exc
            finally:
                group.abort()
            return results

        results = await run_unless_disconnected(raw_request, work())
        if results is None:
            raise APIError("the client disconnected", 400)
        first = prompts[0].get("prompt") if isinstance(prompts[0], dict) else prompts[0]
        self.log_finished(request_id, first, sum(len(r.prompt_token_ids) for r in results), 0, start,
                          "finished")
        return results

    async def scores(self, raw_request: Request, texts_1: list[str], texts_2: list[str], truncate: int | None,
                     activation: bool | None) -> tuple[list[float], int]:
        """Scores of the pairs (``texts_1`` has one text or as many as ``texts_2``) and the prompt tokens used."""
        if not texts_1 or not texts_2:
            raise APIError("give at least one text on each side", 400, "text_1" if not texts_1 else "text_2")
        if len(texts_1) > 1 and len(texts_1) != len(texts_2):
            raise APIError(f"text_1 and text_2 must pair 1:1, 1:N or N:N; got {len(texts_1)} and {len(texts_2)} "
                           "texts", 400, "text_1")
        if len(texts_1) + len(texts_2) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} texts per request", 400)
        if self.task == "embed":  # bi-encoder: cosine similarity of the embeddings
            if activation is not None:
                raise APIError("activation: not an option of an embedding model's scores", 400, "activation")
            prompts = await self.prompts(texts_1 + texts_2, True, "text_1")
            outputs = await self.pool(raw_request, "score", prompts, self.params("embed", truncate))
            left = torch.stack([o.outputs.data for o in outputs[:len(texts_1)]])
            right = torch.stack([o.outputs.data for o in outputs[len(texts_1):]])
            scores = torch.nn.functional.cosine_similarity(left, right, dim=-1)
            return scores.tolist(), sum(len(o.prompt_token_ids) for o in outputs)
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        tokenizer = self.require_tokenizer()
        truncate = self.max_model_len if truncate == -1 else truncate
        prompts = [pair_prompt(tokenizer, a, b, truncate) for a, b in zip(texts_1, texts_2)]
        outputs = await self.pool(raw_request, "score", prompts, self.params("score", None, activation=activation))
        return [float(o.outputs.data) for o in outputs], sum(len(o.prompt_token_ids) for o in outputs)


def _usage(outputs: list[Any]) -> UsageInfo:
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def _encode_vector(data: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: the raw little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(data.numpy(), dtype="<f4").tobytes()).decode("ascii")
    return data.tolist()


class _GenerationRoutesGuard:
    """On a pooling model, the generation routes answer 400 naming the served task (before any parsing)."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app: Any, task: str) -> None:
        self.app = app
        self.message = (f"this server's model serves the {task!r} task, not text generation; use "
                        f"{_TASK_ROUTES.get(task, '/pooling')}")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path", "").endswith(self.PATHS):
            await JSONResponse(error_body(self.message, 400), status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def register_pooling_routes(app: FastAPI, engine: Any, config: Any, models: Any = None) -> None:
    """Add the pooling routes to ``app`` (and, for a pooling model, the guard of the generation routes)."""
    serving = OpenAIServingPooling(engine, config, models)
    if serving.task != "generate":
        app.add_middleware(_GenerationRoutesGuard, task=serving.task)
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500)}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Any:
        """OpenAI's embeddings API: one embedding per input (floats, or base64 of little-endian float32)."""
        serving.check_task("embed", "/v1/embeddings")
        model = serving.check_model(request.model)
        params = serving.params("embed", request.truncate_prompt_tokens, dimensions=request.dimensions,
                                normalize=request.normalize)
        prompts = await serving.prompts(request.input, request.add_special_tokens)
        outputs = await serving.pool(raw_request, "embd", prompts, params)
        data = [EmbeddingData(index=i, embedding=_encode_vector(o.outputs.data, request.encoding_format))
                for i, o in enumerate(outputs)]
        return EmbeddingResponse(id=f"embd-{uuid.uuid4().hex}", model=model, data=data, usage=_usage(outputs))

    @app.post("/pooling", response_model=PoolingResponse, responses=errors)
    async def create_pooling(request: PoolingRequest, raw_request: Request) -> Any:
        """The pooler's raw output per input."""
        serving.check_task("pooling", "/pooling")
        model = serving.check_model(request.model)
        params = serving.params("encode", request.truncate_prompt_tokens, dimensions=request.dimensions,
                                normalize=request.normalize)
        prompts = await serving.prompts(request.input, request.add_special_tokens)
        outputs = await serving.pool(raw_request, "pool", prompts, params)
        data = [PoolingData(index=i, data=_encode_vector(o.outputs.data, request.encoding_format))
                for i, o in enumerate(outputs)]
        return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", model=model, data=data, usage=_usage(outputs))

    @app.post("/classify", response_model=ClassificationResponse, responses=errors)
    async def create_classify(request: ClassificationRequest, raw_request: Request) -> Any:
        """Class probabilities and the most likely label per input."""
        serving.check_task("classify", "/classify")
        model = serving.check_model(request.model)
        params = serving.params("classify", request.truncate_prompt_tokens, activation=request.activation)
        prompts = await serving.prompts(request.input, request.add_special_tokens)
        outputs = await serving.pool(raw_request, "classify", prompts, params)
        labels = getattr(serving.model_config.hf_config, "id2label", None) or {}
        data = []
        for i, o in enumerate(outputs):
            probs = o.outputs.data.tolist()
            best = int(np.argmax(probs))
            data.append(ClassificationData(index=i, label=labels.get(best), probs=probs, num_classes=len(probs)))
        return ClassificationResponse(id=f"classify-{uuid.uuid4().hex}", model=model, data=data, usage=_usage(outputs))

    async def score(request: ScoreRequest, raw_request: Request) -> Any:
        """A score per (text_1, text_2) pair, paired 1:1, 1:N or N:N."""
        serving.check_task("score", raw_request.url.path)
        model = serving.check_model(request.model)
        texts_1 = [request.text_1] if isinstance(request.text_1, str) else request.text_1
        texts_2 = [request.text_2] if isinstance(request.text_2, str) else request.text_2
        scores, tokens = await serving.scores(raw_request, texts_1, texts_2, request.truncate_prompt_tokens,
                                              request.activation)
        return ScoreResponse(id=f"score-{uuid.uuid4().hex}", model=model,
                            data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                            usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank(request: RerankRequest, raw_request: Request) -> RerankResponse:
        """The documents ordered by relevance to the query (the ``top_n`` best; 0: all)."""
        serving.check_task("score", raw_request.url.path)
        model = serving.check_model(request.model)
        scores, tokens = await serving.scores(raw_request, [request.query], request.documents,
                                              request.truncate_prompt_tokens, request.activation)
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n:
            order = order[:request.top_n]
        results = [RerankResult(index=i, document=RerankDocument(text=request.documents[i]),
                                relevance_score=scores[i]) for i in order]
        return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=model, usage=RerankUsage(total_tokens=tokens),
                              results=results)

    for path in ("/score", "/v1/score"):
        app.post(path, response_model=ScoreResponse, responses=errors)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path, response_model=RerankResponse, responses=errors)(rerank)
