"""The FastAPI application of ``pagoda serve``: routes, authentication, limits and error format.

``build_app(engine, config)`` wires an :class:`AsyncEngine` into an app; ``run_server`` serves it with uvicorn,
whose SIGTERM/SIGINT handling stops accepting connections, lets in-flight requests finish (bounded by the
shutdown timeout), then runs the app's shutdown, which stops the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import signal
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.entrypoints.openai import protocol as p
from pagoda.entrypoints.openai.async_engine import (AsyncEngine, EngineDeadError, EngineOverloadedError,
                                                   EngineStoppedError)
from pagoda.entrypoints.openai.metrics import CONTENT_TYPE
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagoda.entrypoints.openai.serving_engine import APIError, ServerConfig, engine_error, error_body
from pagoda.entrypoints.openai.serving_models import OpenAIServingModels, register_lora_routes
from pagoda.entrypoints.openai.serving_pooling import register_pooling_routes
from pagoda.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagoda.logger import init_logger
from pagoda.version import __version__

logger = init_logger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 431, 500, 503)}
_DRAIN_GRACE_S = 2.0  # after ending unfinished requests, time for their handlers to answer before uvicorn cancels
_STREAM = {"content": {"text/event-stream": {}}, "description": "the response, or server-sent events with stream"}


def build_app(engine: AsyncEngine, config: ServerConfig, stats_interval_s: float | None = 10.0,
              models: OpenAIServingModels | None = None) -> FastAPI:
    """The server's app around a constructed (not yet started) engine; the app's startup starts it. ``models``
    holds the LoRA adapters loaded at start (default: the base model alone)."""
    models = models or OpenAIServingModels(engine, config.served_model_names)
    completion = OpenAIServingCompletion(engine, config, models)
    chat = OpenAIServingChat(engine, config, models)
    tokenization = OpenAIServingTokenization(engine, config, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        logger_task = asyncio.create_task(_log_stats(engine, stats_interval_s)) if stats_interval_s else None
        try:
            yield
        finally:
            if logger_task is not None:
                logger_task.cancel()
            await engine.stop()

    app = FastAPI(title="pagoda OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    _install_error_handlers(app)
    _openapi_without_422(app)

    # --------------------------------------------------------------- routes
    # the 200 of /health and /ping has an empty body, as vLLM's: declared without content so the schema says so
    _HEALTH = {"response_class": Response, "responses": {200: {"description": "the engine can serve requests"},
                                                          503: {"model": p.ErrorResponse}}}

    @app.get("/health", **_HEALTH)
    async def health() -> Response:
        """200 while the engine can serve requests, 503 once its loop has failed."""
        if engine.is_healthy:
            return Response(status_code=200)
        reason = engine.error or "the engine is not running"
        return JSONResponse(error_body(f"the engine is not running: {reason}", 503), status_code=503)

    @app.api_route("/ping", methods=["GET", "POST"], **_HEALTH)
    async def ping() -> Response:
        """Same as ``/health`` (the liveness route some platforms probe)."""
        return await health()

    @app.get("/version", response_model=p.VersionResponse)
    async def version() -> p.VersionResponse:
        return p.VersionResponse(version=__version__)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics() -> Response:
        """Prometheus text exposition (vLLM's metric names)."""
        body = engine.metrics.render() if engine.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=p.ModelList, responses=_ERRORS)
    async def list_models() -> p.ModelList:
        """The base model under each served name, then each LoRA adapter (its base model as ``parent``)."""
        return models.show_available_models()

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={**_ERRORS, 200: _STREAM})
    async def create_completion(request: p.CompletionRequest, raw_request: Request) -> Any:
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses={**_ERRORS, 200: _STREAM})
    async def create_chat_completion(request: p.ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=_ERRORS)
    async def tokenize(request: p.TokenizeCompletionRequest | p.TokenizeChatRequest) -> p.TokenizeResponse:
        return await tokenization.tokenize(request)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(request: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return tokenization.detokenize(request)

    register_pooling_routes(app, engine, config, models)  # /v1/embeddings, /score, /rerank, /classify, /pooling
    register_lora_routes(app, models)  # /v1/load_lora_adapter, /v1/unload_lora_adapter (if allowed)

    # --------------------------------------------------------------- middleware (last added runs first)
    app.add_middleware(CORSMiddleware, allow_origins=config.extra.get("allowed_origins", ["*"]),
                       allow_credentials=config.extra.get("allow_credentials", False),
                       allow_methods=["*"], allow_headers=["*"])
    if config.api_key:
        app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(RequestLimitMiddleware, max_body_bytes=config.max_request_body_bytes,
                       max_header_bytes=config.max_header_bytes)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        error = engine_error(exc)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        status = 503 if isinstance(exc, EngineStoppedError) else 500
        return JSONResponse(error_body(str(exc), status), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI clients expect 400 with the offending field named
        errors = exc.errors()
        parts, param = [], None
        for error in errors[:5]:
            loc = [str(x) for x in error.get("loc", ()) if x != "body"]
            # a union (e.g. prompt) reports each alternative: keep the field path, drop the type names
            field = ".".join(x for x in loc if not _is_type_tag(x))
            param = param or field or None
            parts.append(f"{field or 'body'}: {error.get('msg', 'invalid value')}")
        message = "; ".join(dict.fromkeys(parts)) or "invalid request"
        return JSONResponse(error_body(message, 400, param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while handling a request")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", 500), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple|set)\[.*\]|function-.*)$")


def _is_type_tag(part: str) -> bool:
    return bool(_TYPE_TAG.match(part))


def _openapi_without_422(app: FastAPI) -> None:
    """Validation errors are answered 400 here (see the handler), so the schema must not promise FastAPI's 422."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class AuthMiddleware:
    """Every ``/v1`` route needs ``Authorization: Bearer <key>``; other routes (``/health``…) stay open."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        # digests of equal length: compare_digest is then constant-time in the key's length as well as its bytes
        self.expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # behind --root-path the scope's path carries the prefix
            path = path[len(root):]
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if hmac.compare_digest(hashlib.sha256(given).digest(), self.expected):
            return await self.app(scope, receive, send)
        message = "missing API key" if not given else "invalid API key"
        await JSONResponse(error_body(f"{message}: send the header 'Authorization: Bearer <key>'", 401),
                           status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class RequestLimitMiddleware:
    """Refuse headers larger than ``max_header_bytes`` in all (431) and bodies larger than ``max_body_bytes``
    (413), declared or streamed. (The HTTP parser bounds what it buffers of headers sent slowly; this answers a
    request that arrived whole in OpenAI's error format.)"""

    def __init__(self, app: Any, max_body_bytes: int, max_header_bytes: int):
        self.app = app
        self.max_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or ()
        header_bytes = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
        if header_bytes > self.max_header_bytes:
            message = (f"request headers too large: {header_bytes} bytes, the limit is {self.max_header_bytes} "
                       "bytes")
            return await JSONResponse(error_body(message, 431), status_code=431)(scope, receive, send)
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def counting_receive():
            # a body sent without Content-Length (chunked) is counted as it arrives; the route's body reader
            # passes HTTPException through, so the error handler answers 413
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body too large: the limit is {self.max_bytes} bytes"

    async def _reject(self, scope, receive, send) -> None:
        await JSONResponse(error_body(self._message(), 413), status_code=413)(scope, receive, send)


async def _log_stats(engine: AsyncEngine, interval_s: float) -> None:
    """Every ``interval_s``, one line of throughput and load while there is traffic."""
    last = (time.monotonic(), 0, 0)
    last_drafts = 0
    while True:
        await asyncio.sleep(interval_s)
        stats = engine.stats
        if stats is None:
            continue
        now = time.monotonic()
        prompt, generated = stats.prompt_tokens_total, stats.generation_tokens_total
        elapsed = max(now - last[0], 1e-9)
        if prompt != last[1] or generated != last[2] or stats.num_running or stats.num_waiting:
            logger.info("throughput: prompt %.1f tokens/s, generation %.1f tokens/s; running %d, waiting %d; "
                        "KV cache %.1f%% used", (prompt - last[1]) / elapsed, (generated - last[2]) / elapsed,
                        stats.num_running, stats.num_waiting, 100.0 * stats.kv_cache_usage)
        spec = getattr(stats, "spec_decoding", None)
        if spec is not None and spec.num_drafts != last_drafts:
            logger.info("%s", spec.summary())  # cumulative since the server started
            last_drafts = spec.num_drafts
        last = (now, prompt, generated)


def run_server(app: FastAPI, host: str, port: int, *, log_level: str = "info", shutdown_timeout: float = 30.0,
               access_log: bool = True, root_path: str = "", ssl_keyfile: str | None = None,
               ssl_certfile: str | None = None, max_header_bytes: int = 16 * 1024) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain in-flight requests for up to ``shutdown_timeout`` seconds.

    Requests still unfinished at the deadline are ended by the engine, so their clients get a 503 (or an error
    event on a stream) rather than a dropped connection.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout + _DRAIN_GRACE_S, root_path=root_path,
                            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, timeout_keep_alive=5,
                            # h11 caps the request line plus headers it buffers (answering 400 beyond);
                            # httptools, which "auto" would pick where installed, has no such cap
                            http="h11", h11_max_incomplete_event_size=max_header_bytes)
    _Server(config, shutdown_timeout, app.state.engine).run()


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT that ended in a clean drain exits with status 0 (uvicorn
    re-raises the signal after shutting down, so the process would die of it)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, engine: AsyncEngine):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.engine = engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.info("%s received: no new connections; finishing in-flight requests (at most %.0f s)",
                        signal.Signals(sig).name, self.shutdown_timeout)
            loop = self.engine.loop
            if loop is not None:  # a signal handler may only hand work to the loop thread-safely
                loop.call_soon_threadsafe(loop.call_later, self.shutdown_timeout, self.engine.request_stop)
        super().handle_exit(sig, frame)
