"""Output tokens/s against the number of concurrent requests: measure a sweep, then draw the PNG.

``python -m pagoda.benchmarks.plot run --label NAME --json FILE [engine flags]`` loads the model once and, for
each ``--concurrency`` value C, times one ``generate`` of C fresh random prompts (``--input-len`` tokens,
``--output-len`` generated each, greedy, ``ignore_eos``), taking the median of ``--num-iters`` runs; the figures go
to FILE. ``python -m pagoda.benchmarks.plot draw --out PNG FILE...`` draws one line per FILE (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pagoda.utils import FlexibleArgumentParser


def run_sweep(args: argparse.Namespace) -> dict:
    from pagoda.benchmarks.common import greedy_params, make_llm, write_json
    from pagoda.benchmarks.datasets import random_requests
    from pagoda.benchmarks.throughput import run_once, warm_up

    llm = make_llm(args)
    vocab = llm.llm_engine.model_config.vocab_size
    warm_up(llm, vocab, args.seed or 0)
    points = []
    for c in args.concurrency:
        rates = []
        for i in range(args.num_iters):
            requests = random_requests(c, args.input_len, args.output_len, vocab_size=vocab,
                                       seed=(args.seed or 0) + 1000 * c + i)
            seconds, _, output_tokens = run_once(llm, requests, greedy_params)
            rates.append(output_tokens / seconds)
        points.append({"concurrency": c, "output_tokens_per_second": float(np.median(rates)), "runs": rates})
        print(f"concurrency {c:4d}: {np.median(rates):8.2f} output tokens/s (runs: "
              f"{', '.join(f'{r:.1f}' for r in rates)})", flush=True)
    result = {"label": args.label, "input_len": args.input_len, "output_len": args.output_len, "points": points}
    write_json(args.json, result)
    return result


def draw(files: list[str], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for path in files:
        data = json.loads(Path(path).read_text())
        xs = [p["concurrency"] for p in data["points"]]
        ys = [p["output_tokens_per_second"] for p in data["points"]]
        ax.plot(xs, ys, marker="o", label=data["label"])
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p["concurrency"] for f in files for p in json.loads(Path(f).read_text())["points"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent requests (one generate call, all admitted at once)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    from pagoda.core.engine_args import EngineArgs

    parser = FlexibleArgumentParser(prog="python -m pagoda.benchmarks.plot", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="measure output tokens/s at each concurrency")
    run.add_argument("--label", required=True, help="name of the line in the plot")
    run.add_argument("--json", required=True, help="file for the figures")
    run.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    run.add_argument("--input-len", type=int, default=128)
    run.add_argument("--output-len", type=int, default=128)
    run.add_argument("--num-iters", type=int, default=1, help="runs per point (median)")
    EngineArgs.add_cli_args(run)
    plot = sub.add_parser("draw", help="draw the PNG from sweep files")
    plot.add_argument("files", nargs="+")
    plot.add_argument("--out", required=True)
    plot.add_argument("--title", default="pagoda: output tokens/s vs concurrent requests")
    args = parser.parse_args(argv)
    if args.action == "run":
        run_sweep(args)
    else:
        draw(args.files, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
