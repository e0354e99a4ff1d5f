"""The ``pagoda`` command: a thin dispatcher over subcommand modules.

Each subcommand module defines ``register(subparsers)`` (adds its parser and sets ``func``); modules are imported
only when their command runs, so ``pagoda --help`` stays fast. Errors a user can act on (``ValueError``,
``FileNotFoundError``, ``RuntimeError``) print one line; ``PAGODA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

from pagoda import envs
from pagoda.utils import FlexibleArgumentParser

SUBCOMMANDS = {
    "generate": ("pagoda.entrypoints.generate_cmd", "generate completions for prompts"),
    "chat": ("pagoda.entrypoints.chat_cmd", "chat with a model in the terminal"),
    "serve": ("pagoda.entrypoints.openai.serve_cmd", "run the OpenAI-compatible server"),
    "env": ("pagoda.entrypoints.env_cmd", "show platforms, attention backends, quantization methods and plugins"),
    "bench": ("pagoda.entrypoints.bench_cmd", "benchmark throughput, latency or a running server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = FlexibleArgumentParser(prog="pagoda", description="pagoda: fast LLM inference and serving")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if wanted is None or name == wanted:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                subparsers.add_parser(name, help=help_text + " (not available)")
                continue
            module.register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if envs.debug_tracebacks():
            raise
        print(f"pagoda {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
