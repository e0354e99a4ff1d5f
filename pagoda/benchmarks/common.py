"""Helpers shared by the benchmark commands: engine construction, statistics, JSON results."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (10, 25, 50, 75, 90, 99)


def make_llm(args: argparse.Namespace) -> Any:
    """A ``pagoda.LLM`` from the engine flags in ``args`` (the bundled model when ``--model`` is absent)."""
    from pagoda.core.engine_args import EngineArgs
    from pagoda.entrypoints.llm import LLM

    return LLM(**vars(EngineArgs.from_cli_args(args)))


def greedy_params(max_tokens: int, temperature: float = 0.0, detokenize: bool = True) -> Any:
    """Sampling parameters of the benchmarks: a fixed output length (``ignore_eos``), greedy by default."""
    from pagoda.sampling_params import SamplingParams

    return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                          ignore_eos=True, detokenize=detokenize)


def summarize(values_s: list[float] | np.ndarray, scale: float = 1000.0) -> dict[str, float]:
    """Mean, median, standard deviation and p99 of ``values_s`` multiplied by ``scale`` (ms by default)."""
    arr = np.asarray(values_s, dtype=np.float64) * scale
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()),
            "p99": float(np.percentile(arr, 99))}


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write ``result`` (plus the date) to ``path`` when one was given."""
    if not path:
        return
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Results written to {target}")
