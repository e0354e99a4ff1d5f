"""Cost of the tool parsers per streamed delta: ``python -m pagoda.benchmarks.tool_parsers``.

Streams a synthetic reply (``--num-calls`` calls whose arguments are about ``--argument-chars`` long) through each
parser in pieces of ``--chars-per-delta`` characters (about one token), and reports the microseconds each delta
costs on average and for the last piece of the reply, next to a whole-output extraction. A tool request pays
this on top of every decode step; requests without tools never reach a parser.
"""

from __future__ import annotations

import argparse
import json
import time

from pagoda.entrypoints.openai.tool_calling import RequiredToolParser
from pagoda.entrypoints.openai.tool_parsers import ToolParserManager


def replies(num_calls: int, argument_chars: int) -> dict[str, tuple[object, str]]:
    text = "lorem ipsum " * max(1, argument_chars // 40)
    half = argument_chars // 2
    calls = [{"name": f"tool_{i}", "arguments": {"query": text[:half], "page": i,
                                                   "filters": {"lang": ["en", "fr"], "text": text[half:]}}}
             for i in range(num_calls)]
    hermes = "Checking.\n" + "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
    llama = "<|python_tag|>" + "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    required = json.dumps([{"name": c["name"], "parameters": c["arguments"]} for c in calls])
    return {"hermes": (ToolParserManager.get_tool_parser("hermes"), hermes),
            "llama3_json": (ToolParserManager.get_tool_parser("llama3_json"), llama),
            "required": (RequiredToolParser, required)}


def run_one(parser_cls, reply: str, chars_per_delta: int) -> dict[str, float]:
    parser = parser_cls(None)
    text, times = "", []
    for start in range(0, len(reply), chars_per_delta):
        piece = reply[start:start + chars_per_delta]
        began = time.perf_counter()
        parser.extract_tool_calls_streaming(text, text + piece, piece, (), (), (), None)
        times.append(time.perf_counter() - began)
        text += piece
    parser.finish_streaming(text, None)
    began = time.perf_counter()
    parser_cls(None).extract_tool_calls(reply, None)
    whole = time.perf_counter() - began
    return {"deltas": len(times), "mean_us": 1e6 * sum(times) / len(times), "last_us": 1e6 * times[-1],
            "whole_ms": 1e3 * whole}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-calls", type=int, default=2)
    parser.add_argument("--argument-chars", type=int, default=400)
    parser.add_argument("--chars-per-delta", type=int, default=4)


def main(args: argparse.Namespace) -> None:
    print(f"{'parser':<12} {'chars':>7} {'deltas':>7} {'mean us/delta':>14} {'last us/delta':>14} {'whole ms':>9}")
    for name, (parser_cls, reply) in replies(args.num_calls, args.argument_chars).items():
        result = run_one(parser_cls, reply, args.chars_per_delta)
        print(f"{name:<12} {len(reply):>7} {result['deltas']:>7} {result['mean_us']:>14.1f} "
              f"{result['last_us']:>14.1f} {result['whole_ms']:>9.2f}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(cli)
    main(cli.parse_args())
