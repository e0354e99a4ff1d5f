"""The models a server answers to — the base model under its served names and LoRA adapters beside it — and
vLLM's adapter routes: ``/v1/models``, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Adapters come from ``--lora-modules`` (loaded on the engine thread while the engine is built, so a bad one stops
the server at start) or, with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` set, from the load route. A request's
``model`` naming an adapter runs with that adapter's ``LoRARequest``. Loading and unloading reach the engine
through the engine thread (:meth:`AsyncEngine.call`), like requests: the HTTP side never touches the engine.

Unloading an adapter removes its name at once (new requests naming it get a 404, as in vLLM); requests already
running with it finish with it, and the engine drops the adapter when the last of them ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import Field

from pagoda import envs
from pagoda.entrypoints.openai.async_engine import EngineDeadError
from pagoda.entrypoints.openai.protocol import (ErrorInfo, ErrorResponse, ModelCard, ModelList, ModelPermission,
                                                OpenAIBaseModel)
from pagoda.logger import init_logger
from pagoda.lora.request import LoRARequest

logger = init_logger(__name__)


# ---------------------------------------------------------------------------- --lora-modules
@dataclass
class LoRAModulePath:
    """One ``--lora-modules`` entry (vLLM's class): the adapter's served name, its directory, and the served base
    model it is listed under (default: the first served name)."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModulePath:
    """``name=path`` or vLLM's JSON form ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    if value.lstrip().startswith("{"):
        try:
            entry = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: {value!r} is not valid JSON ({exc})") from None
        unknown = sorted(set(entry) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"--lora-modules: unknown key(s) {', '.join(unknown)} in {value!r}; the keys are name, "
                             "path and base_model_name")
        name, path = entry.get("name"), entry.get("path")
        base = entry.get("base_model_name")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path or \
                (base is not None and not isinstance(base, str)):
            raise ValueError(f"--lora-modules: {value!r} needs \"name\" and \"path\" as non-empty strings (and "
                             "\"base_model_name\", if given, a string)")
        return LoRAModulePath(name, path, base)
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules: {value!r} must be name=path or JSON "
                         '\'{"name": ..., "path": ..., "base_model_name": ...}\'')
    return LoRAModulePath(name, path)


def static_lora_requests(modules: list[LoRAModulePath], served_names: list[str] | None,
                         enable_lora: bool) -> list[LoRARequest]:
    """The ``LoRARequest`` of each ``--lora-modules`` entry (ids 1, 2, ...), checked against the served names
    (``None``: not known yet, not checked)."""
    if modules and not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    requests: list[LoRARequest] = []
    seen: set[str] = set()
    for module in modules:
        if module.name in seen:
            raise ValueError(f"--lora-modules: the name {module.name!r} is given twice")
        if served_names is not None and module.name in served_names:
            raise ValueError(f"--lora-modules: the name {module.name!r} is the base model's served name; give the "
                             "adapter another name")
        if served_names is not None and module.base_model_name is not None and \
                module.base_model_name not in served_names:
            raise ValueError(f"--lora-modules: base_model_name {module.base_model_name!r} of {module.name!r} is not "
                             f"a served model name; the served names are: {', '.join(served_names)}")
        seen.add(module.name)
        requests.append(LoRARequest(module.name, len(requests) + 1, module.path, module.base_model_name))
    return requests


def load_static_loras(engine: Any, requests: list[LoRARequest]) -> None:
    """Load the ``--lora-modules`` adapters into a freshly built engine (on the engine thread); the first that
    fails stops the server with its reason."""
    for request in requests:
        try:
            engine.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the flag's fault; say which entry
            raise ValueError(f"--lora-modules {request.lora_name}={request.lora_path}: {exc}") from exc
        logger.info("loaded LoRA adapter %r from %s", request.lora_name, request.lora_path)


# ---------------------------------------------------------------------------- request bodies
class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str | None = None
    lora_int_id: int | None = Field(default=None, ge=1)


class AdapterError(Exception):
    """An adapter route's error: vLLM's status and error type (``InvalidUserInput`` for names in use)."""

    def __init__(self, message: str, status: int, err_type: str, param: str | None = None):
        super().__init__(message)
        self.response = JSONResponse(
            ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status)).model_dump(),
            status_code=status)


# ---------------------------------------------------------------------------- the registry
class OpenAIServingModels:
    """The served names and adapters, shared by every handler of one server (event-loop side only)."""

    def __init__(self, engine: Any, served_model_names: list[str], lora_requests: list[LoRARequest] = ()):
        self.engine = engine
        self.served_model_names = list(served_model_names)
        llm_engine = engine.engine
        self.model_path: str = llm_engine.model_config.model
        self.max_model_len: int = llm_engine.model_config.max_model_len
        self.lora_enabled = getattr(llm_engine.config, "lora", None) is not None
        self.lora_requests: dict[str, LoRARequest] = {r.lora_name: r for r in lora_requests}
        self._next_id = max((r.lora_int_id for r in lora_requests), default=0) + 1
        self._loading: set[str] = set()  # names being loaded right now: a second load of one is a duplicate
        self._in_flight: dict[int, int] = {}  # adapter id → unfinished request groups using it
        self._retired: set[int] = set()  # unloaded adapters still in use: the engine drops them when idle
        engine.lora_tracker = self

    # ------------------------------------------------------------------ model names
    def resolve(self, name: str | None) -> tuple[str, LoRARequest | None]:
        """The name to answer with and the adapter it selects; ``KeyError`` for a name this server doesn't
        serve."""
        if not name:
            return self.served_model_names[0], None
        if name in self.served_model_names:
            return name, None
        lora = self.lora_requests.get(name)
        if lora is None:
            raise KeyError(name)
        return name, lora

    def names(self) -> list[str]:
        return self.served_model_names + list(self.lora_requests)

    def show_available_models(self) -> ModelList:
        cards = [ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len,
                           permission=[ModelPermission(id=f"modelperm-{name}")]) for name in self.served_model_names]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path, max_model_len=self.max_model_len,
                            parent=lora.base_model_name or self.served_model_names[0],
                            permission=[ModelPermission(id=f"modelperm-{lora.lora_name}")])
                  for lora in self.lora_requests.values()]
        return ModelList(data=cards)

    # ------------------------------------------------------------------ adapters in use
    def acquire(self, lora: LoRARequest) -> Callable[[], None]:
        """Count a request group using ``lora``; the returned callable ends it (called once the group is done)."""
        key = lora.lora_int_id
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

        def release() -> None:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
                return
            del self._in_flight[key]
            if key in self._retired:
                self._retired.discard(key)
                logger.info("LoRA adapter %d: its last request ended; dropping it from the engine", key)
                self.engine.call_soon(_remove_lora(key))
        return release

    # ------------------------------------------------------------------ runtime loading
    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> str:
        name, path = body.lora_name, body.lora_path
        if not name or not path:
            raise AdapterError("Both 'lora_name' and 'lora_path' must be provided.", 400, "InvalidUserInput")
        if name in self.lora_requests or name in self._loading:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.", 400, "InvalidUserInput",
                               "lora_name")
        if name in self.served_model_names:
            raise AdapterError(f"The name '{name}' is the base model's served name; give the adapter another name.",
                               400, "InvalidUserInput", "lora_name")
        if not self.lora_enabled:
            raise AdapterError("LoRA adapters are not enabled on this server: start it with --enable-lora", 400,
                               "BadRequestError")
        lora = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self._loading.add(name)
        try:
            await self.engine.call(lambda engine: engine.add_lora(lora))
        except EngineDeadError:
            raise  # the server's failure, answered 500/503 like any request's
        except Exception as exc:  # noqa: BLE001 - the engine's reason goes to the client; the engine serves on
            if not os.path.exists(path):  # vLLM answers a missing adapter 404, any other failure 400
                raise AdapterError(f"No adapter found for {path}: {exc}", 404, "NotFoundError", "lora_path") from exc
            raise AdapterError(str(exc), 400, "BadRequestError", "lora_path") from exc
        finally:
            self._loading.discard(name)
        self.lora_requests[name] = lora
        logger.info("loaded LoRA adapter %r from %s", name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> str:
        if not body.lora_name and body.lora_int_id is None:
            raise AdapterError("either 'lora_name' and 'lora_int_id' needs to be provided.", 400,
                               "InvalidUserInput")
        lora = self.lora_requests.get(body.lora_name) if body.lora_name else next(
            (r for r in self.lora_requests.values() if r.lora_int_id == body.lora_int_id), None)
        if lora is None or (body.lora_int_id is not None and lora.lora_int_id != body.lora_int_id):
            shown = body.lora_name if body.lora_name else body.lora_int_id
            raise AdapterError(f"The lora adapter '{shown}' cannot be found.", 404, "NotFoundError",
                               "lora_name" if body.lora_name else "lora_int_id")
        del self.lora_requests[lora.lora_name]
        if lora.lora_int_id in self._in_flight:
            self._retired.add(lora.lora_int_id)  # removed from the engine when its last request ends
        else:
            await self.engine.call(_remove_lora(lora.lora_int_id))
        logger.info("unloaded LoRA adapter %r", lora.lora_name)
        return f"Success: LoRA adapter '{lora.lora_name}' removed successfully."


def _remove_lora(lora_int_id: int) -> Callable[[Any], Any]:
    return lambda engine: engine.remove_lora(lora_int_id)


def register_lora_routes(app: FastAPI, models: OpenAIServingModels) -> None:
    """``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, only with VLLM_ALLOW_RUNTIME_LORA_UPDATING (as
    vLLM: without it the routes don't exist)."""
    if not envs.allow_runtime_lora_updating():
        return
    logger.warning("LoRA adapters can be loaded and unloaded at runtime (VLLM_ALLOW_RUNTIME_LORA_UPDATING): "
                   "anyone who can reach /v1 can make the server read files")
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500)}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=errors)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Any:
        """Load a PEFT adapter directory under a new model name; it serves requests at once."""
        try:
            return PlainTextResponse(await models.load_lora_adapter(body))
        except AdapterError as exc:
            return exc.response

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=errors)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Any:
        """Forget an adapter by ``lora_name`` (or ``lora_int_id``); requests running with it finish with it."""
        try:
            return PlainTextResponse(await models.unload_lora_adapter(body))
        except AdapterError as exc:
            return exc.response


# ---------------------------------------------------------------------------- metrics
def lora_requests_info(engine: Any) -> tuple[str, str, int, float]:
    """``(running adapters, waiting adapters, max_loras, time)`` for vLLM's ``vllm:lora_requests_info`` gauge:
    the names of the adapters the scheduler's running and waiting requests use, comma-separated (engine thread;
    called only when LoRA is enabled, at the stats refresh rate)."""
    import time

    scheduler = engine.scheduler

    def names(requests: Any) -> str:
        found = {lora.lora_name for r in requests if (lora := getattr(r, "lora_request", None)) is not None}
        return ",".join(sorted(found))

    return names(scheduler.running), names(scheduler.waiting), engine.config.lora.max_loras, time.time()
