"""Sampling flags shared by ``pagoda generate`` and ``pagoda chat``; unset flags keep the model's defaults."""

from __future__ import annotations

import argparse

from pagoda.sampling_params import SamplingParams

_FLAGS = (
    ("max_tokens", int, "most tokens to generate"),
    ("temperature", float, "sampling temperature (0 = greedy)"),
    ("top_p", float, "nucleus sampling probability mass"),
    ("top_k", int, "sample from the k most likely tokens (0 = all)"),
    ("min_p", float, "drop tokens below this fraction of the most likely token's probability"),
    ("presence_penalty", float, "penalty for tokens already generated"),
    ("frequency_penalty", float, "penalty growing with how often a token was generated"),
    ("repetition_penalty", float, "penalty for tokens in the prompt or output (1 = none)"),
    ("n", int, "completions per prompt"),
    ("sampling_seed", int, "seed of this request's sampling (reproducible output)"),
)


def add_sampling_flags(parser: argparse.ArgumentParser, default_max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling")
    for name, kind, help_text in _FLAGS:
        default = default_max_tokens if name == "max_tokens" else None
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_text)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating after EOS")


def sampling_params_from_flags(args: argparse.Namespace, defaults: SamplingParams) -> SamplingParams:
    params = defaults.clone()
    for name, _, _ in _FLAGS:
        value = getattr(args, name)
        if value is not None:
            setattr(params, "seed" if name == "sampling_seed" else name, value)
    if args.stop:
        params.stop = list(args.stop)
    if args.ignore_eos:
        params.ignore_eos = True
    return SamplingParams(**{f: getattr(params, f) for f in params.__dataclass_fields__})  # re-validate
