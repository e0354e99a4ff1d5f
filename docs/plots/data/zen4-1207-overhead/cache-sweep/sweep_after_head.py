"""`pagoda bench step-overhead`, with a sweep over MB megabytes (env MB, default 256) after each step's LM head:
the engine's per-step host work then runs on caches emptied as a real model's weight reads empty them.
Usage: MB=256 python sweep_after_head.py --model DIR --load-format dummy --dtype bfloat16 --num-steps 200"""
import argparse
import os
import sys

import torch

import pagoda.benchmarks.profile_step as profile_step

parser = argparse.ArgumentParser()
profile_step.add_cli_args(parser)
args = parser.parse_args(sys.argv[1:])
megabytes = int(os.environ.get("MB", "256"))
sweep = torch.ones(megabytes * 2**18)  # float32
instrument = profile_step.instrument


def instrument_with_sweep(engine):
    model = engine.runner.model
    head = model.compute_greedy

    def head_then_sweep(*a, **k):
        out = head(*a, **k)
        if megabytes:
            sweep.sum()
        return out

    model.compute_greedy = head_then_sweep  # timed as part of the model, so not as engine overhead
    return instrument(engine)


profile_step.instrument = instrument_with_sweep
profile_step.main(args)
