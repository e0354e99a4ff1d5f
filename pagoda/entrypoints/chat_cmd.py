"""``pagoda chat``: an interactive terminal chat that streams the reply as it is generated.

The conversation is kept across turns and rendered with the model's chat template each turn (the prefix
cache makes the repeated history cheap); ``/clear`` forgets it (the system prompt stays). Sampling takes the
model's defaults, as the server does, unless a flag sets a field. Ctrl-C during a reply stops that reply and keeps
what was said so far; Ctrl-D (or ``/quit``, or Ctrl-C) at the prompt ends the session.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
from typing import Any

from pagoda.core.engine_args import EngineArgs
from pagoda.entrypoints.sampling_flags import add_sampling_flags, sampling_params_from_flags

HELP = "Commands: /clear forgets the conversation, /quit ends the session. Ctrl-C stops a reply."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal",
                                   description="Chat with a model in the terminal. " + HELP)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--chat-template", default=None, help="chat template (Jinja string or file)")
    add_sampling_flags(parser, default_max_tokens=None)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)


class _Interrupt:
    """While a reply streams, Ctrl-C only raises a flag that the loop checks between engine steps: an exception
    raised in the middle of a step would leave the engine half-updated."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run(args: argparse.Namespace) -> int:
    from pagoda.core.engine import LLMEngine
    from pagoda.entrypoints.chat_utils import apply_chat_template
    from pagoda.sampling_params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    params = sampling_params_from_flags(args, engine.get_default_sampling_params())
    params.output_kind = RequestOutputKind.DELTA
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    ids = itertools.count()
    print(f"Chatting with {engine.model_config.served_model_name}. {HELP} Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/clear":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        prompt = apply_chat_template(engine.tokenizer, messages, args.chat_template)
        token_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        request_id = f"chat-{next(ids)}"
        try:
            engine.add_request(request_id, {"prompt": prompt, "prompt_token_ids": token_ids}, params)
        except ValueError as exc:  # the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"error: {exc}. /clear starts a new conversation.", file=sys.stderr)
            continue
        reply = []
        with _Interrupt() as interrupt:
            while engine.has_unfinished_requests():
                if interrupt.requested:
                    engine.abort_request(request_id)
                    break
                for output in engine.step():
                    delta = output.outputs[0].text
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        print(flush=True)
        if interrupt.requested:
            print("(reply stopped)", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})
