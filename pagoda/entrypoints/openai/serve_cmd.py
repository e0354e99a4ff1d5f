"""``pagoda serve [MODEL] [engine flags] [server flags]``: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import gc
import json
import os
from typing import Any

from pagoda import envs
from pagoda.core.engine_args import EngineArgs
from pagoda.logger import init_logger

logger = init_logger(__name__)

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible server",
        description="Serve a model over HTTP with OpenAI's completions and chat APIs (vLLM-compatible).")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory, hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None, help="the model, as an alternative to the positional MODEL")
    add_server_args(parser)
    EngineArgs.add_cli_args(parser, model_positional=True)
    parser.set_defaults(func=run)
    return parser


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server arguments")
    group.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer <key>' on every /v1 route (default: $VLLM_API_KEY)")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template (a file path or the template itself) replacing the model's")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests carry their own chat_template (Jinja text run by the server)")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="longest prompt text printed in the per-request log line (default: unlimited)")
    group.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    group.add_argument("--uvicorn-log-level", default="info", choices=UVICORN_LOG_LEVELS,
                       help="log level of uvicorn")
    group.add_argument("--disable-uvicorn-access-log", action="store_true", help="no uvicorn access log")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before cancelling them")
    group.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024,
                       help="largest request body accepted (larger: 413)")
    group.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="requests allowed to wait beyond the --max-num-seqs running ones; more get 503 with "
                            "Retry-After (a prompt of a multi-prompt completion counts as one; -1: no limit)")
    group.add_argument("--max-header-bytes", type=int, default=16 * 1024,
                       help="largest total size of a request's headers (larger: 431)")
    group.add_argument("--log-stats-interval", type=float, default=10.0,
                       help="seconds between throughput log lines (see also --disable-log-stats)")
    group.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS allowed origins (JSON)")
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument("--root-path", default="", help="path prefix when behind a path-based proxy")
    group.add_argument("--ssl-keyfile", default=None, help="TLS key file")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model choose when to call tools (tool_choice "auto"); needs --tool-call-parser')
    group.add_argument("--tool-call-parser", default=None,
                       help="how tool calls are read out of the model's output: hermes, llama3_json, or a name "
                            "a --tool-parser-plugin registers")
    group.add_argument("--tool-parser-plugin", default=None,
                       help="a Python file registering more tool parsers with ToolParserManager")
    group.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                       help='don\'t show the tools to the model when a request says tool_choice "none"')
    group.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters to serve under their own model names (needs --enable-lora): name=path, "
                            'or JSON \'{"name": ..., "path": ..., "base_model_name": ...}\'')


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" not in value:
        raise FileNotFoundError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


def _check_tool_args(args: argparse.Namespace) -> None:
    """The tool-calling flags, checked before the model loads."""
    from pagoda.entrypoints.openai.tool_parsers import ToolParserManager

    if args.tool_parser_plugin:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (registered parsers: "
                         f"{', '.join(sorted(ToolParserManager.tool_parsers))})")
    if args.tool_call_parser:
        try:
            ToolParserManager.get_tool_parser(args.tool_call_parser)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None


def _build_warm_engine(engine_args: EngineArgs, lora_modules: list[Any], loaded: list[Any]):
    """The engine with the ``--lora-modules`` adapters loaded (their ``LoRARequest``s appended to ``loaded``),
    warmed up (see ``LLMEngine.warm_up``); called on the engine thread."""
    from pagoda.engine_dp import build_engine
    from pagoda.entrypoints.openai.serving_models import load_static_loras, static_lora_requests

    engine = build_engine(engine_args)  # with -dp N: N replica processes behind one engine interface
    names = _served_names(engine_args, engine)
    loaded += static_lora_requests(lora_modules, names, getattr(engine_args, "enable_lora", False))
    load_static_loras(engine, loaded)
    engine.warm_up()
    return engine


def _served_names(engine_args: EngineArgs, engine: Any) -> list[str]:
    names = engine_args.served_model_name
    if isinstance(names, str):
        names = [names]
    return list(names or [engine.model_config.served_model_name])


def run(args: argparse.Namespace) -> int:
    from pagoda.entrypoints.openai.api_server import build_app, run_server
    from pagoda.entrypoints.openai.async_engine import AsyncEngine
    from pagoda.entrypoints.openai.metrics import ServerMetrics
    from pagoda.entrypoints.openai.serving_engine import ServerConfig
    from pagoda.entrypoints.openai.serving_models import (OpenAIServingModels, lora_requests_info,
                                                          parse_lora_module, static_lora_requests)

    if args.model and args.model_tag and args.model != args.model_tag:
        raise ValueError(f"the model is given twice and differently: MODEL {args.model_tag!r} and --model "
                         f"{args.model!r}")
    args.model = args.model or args.model_tag
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    if args.max_waiting_requests < -1:
        raise ValueError(f"--max-waiting-requests must be >= 0 (or -1: no limit), got {args.max_waiting_requests}")
    if args.max_header_bytes < 1024:
        raise ValueError(f"--max-header-bytes must be >= 1024, got {args.max_header_bytes}")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len must be >= 0, got {args.max_log_len}")
    chat_template = _read_chat_template(args.chat_template)
    _check_tool_args(args)
    lora_modules = [parse_lora_module(value) for value in args.lora_modules or []]
    engine_args = EngineArgs.from_cli_args(args, usage_context="openai_api_server")
    # the flags' own mistakes before the model loads (names against the served names once it has)
    static_lora_requests(lora_modules, None, getattr(engine_args, "enable_lora", False))
    loras: list[Any] = []
    async_engine = AsyncEngine.build(lambda: _build_warm_engine(engine_args, lora_modules, loras))
    engine = async_engine.engine
    if args.max_waiting_requests >= 0:
        running = engine.config.scheduler.max_num_seqs * engine.config.parallel.data_parallel_size
        async_engine.max_pending = running + args.max_waiting_requests

    names = _served_names(engine_args, engine)
    models = OpenAIServingModels(async_engine, names, loras)
    if getattr(engine.config, "lora", None) is not None:
        async_engine.lora_info_reader = lora_requests_info
    async_engine.metrics = ServerMetrics(names[0], lambda: async_engine.stats, lambda: async_engine.lora_info)
    config = ServerConfig(served_model_names=names, chat_template=chat_template, max_log_len=args.max_log_len,
                          log_requests=not args.disable_log_requests, api_key=args.api_key or envs.api_key(),
                          max_request_body_bytes=args.max_request_body_bytes,
                          max_header_bytes=args.max_header_bytes,
                          trust_request_chat_template=args.trust_request_chat_template,
                          enable_auto_tool_choice=args.enable_auto_tool_choice,
                          tool_call_parser=args.tool_call_parser,
                          exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                          extra={"allowed_origins": args.allowed_origins,
                                 "allow_credentials": args.allow_credentials})
    stats_interval = None if engine_args.disable_log_stats else args.log_stats_interval
    app = build_app(async_engine, config, stats_interval_s=stats_interval, models=models)
    logger.info("serving %s as %s on http://%s:%d (max_model_len %d)%s", engine.model_config.model,
                ", ".join(names), args.host, args.port, engine.model_config.max_model_len,
                "; API key required on /v1" if config.api_key else "")
    # What exists now (model, tokenizer, modules) lives as long as the server: take it out of the garbage
    # collector's generations, whose full collections would otherwise walk it all (70-190 ms, holding the GIL).
    gc.collect()
    gc.freeze()
    run_server(app, args.host, args.port, log_level=args.uvicorn_log_level, shutdown_timeout=args.shutdown_timeout,
               access_log=not args.disable_uvicorn_access_log, root_path=args.root_path,
               max_header_bytes=args.max_header_bytes,
               ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    return 0
