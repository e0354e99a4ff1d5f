"""``pagoda generate PROMPT...``: print completions (the bundled model unless ``--model`` is given)."""

from __future__ import annotations

import argparse

from pagoda.core.engine_args import EngineArgs
from pagoda.entrypoints.sampling_flags import add_sampling_flags, sampling_params_from_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate completions for prompts",
                                   description="Generate completions for each PROMPT and print them.")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_sampling_flags(parser, default_max_tokens=64)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagoda.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = sampling_params_from_flags(args, llm.get_default_sampling_params())
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for i, output in enumerate(outputs):
        for completion in output.outputs:
            label = f"[{i}" + (f".{completion.index}" if len(output.outputs) > 1 else "") + "] "
            prefix = label if len(outputs) > 1 or len(output.outputs) > 1 else ""
            print(f"{prefix}{output.prompt}{completion.text}", flush=True)
    return 0
