"""``pagoda chat``: an interactive terminal chat that streams the reply as it is generated.

The conversation is kept across turns and rendered with the model's chat template each turn (the prefix
cache makes the repeated history cheap). Ctrl-D or Ctrl-C at the prompt ends the session; Ctrl-C during a reply
stops that reply.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from pagoda.core.engine_args import EngineArgs
from pagoda.entrypoints.sampling_flags import add_sampling_flags, sampling_params_from_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal",
                                   description="Chat with a model in the terminal; Ctrl-D or Ctrl-C quits.")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--chat-template", default=None, help="chat template (Jinja string or file)")
    add_sampling_flags(parser, default_max_tokens=512)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagoda.core.engine import LLMEngine
    from pagoda.entrypoints.chat_utils import apply_chat_template
    from pagoda.sampling_params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    params = sampling_params_from_flags(args, engine.get_default_sampling_params())
    params.output_kind = RequestOutputKind.DELTA
    messages = [{"role": "system", "content": args.system}] if args.system else []
    ids = itertools.count()
    print("Chatting with the model; Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = apply_chat_template(engine.tokenizer, messages, args.chat_template)
        token_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        request_id = f"chat-{next(ids)}"
        engine.add_request(request_id, {"prompt": prompt, "prompt_token_ids": token_ids}, params)
        reply = []
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    delta = output.outputs[0].text
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            engine.abort_request(request_id)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
